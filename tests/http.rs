//! HTTP on both sides: the metrics endpoint (hyper) under slow and idle
//! clients, and the schema registry client (ureq) over HTTPS with a private
//! CA and basic auth, against a real TLS server (Python's `ssl` module with
//! a certificate made by the `openssl` command).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ml_worker::worker::config::SchemaRegistryConfig;
use ml_worker::worker::metrics::{serve, Admin, Metrics, HEADER_READ_TIMEOUT};
use ml_worker::worker::schema_registry::{LookupError, SchemaRegistry};

fn endpoint() -> (SocketAddr, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let addr = serve(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(Metrics::default()),
        Admin::default(),
        stop.clone(),
    )
    .unwrap();
    (addr, stop)
}

/// GET `path`; the status and how long it took.
fn get(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, t.elapsed())
}

#[test]
fn slow_and_idle_clients_delay_nobody_else() {
    let (addr, stop) = endpoint();
    // 20 idle connections and one sending a byte every 1.5 s
    let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut slow = TcpStream::connect(addr).unwrap();
    let dripping = std::thread::spawn(move || {
        for b in b"GET /readyz HTTP/1.1\r\n" {
            if slow.write_all(&[*b]).is_err() {
                return true; // closed by the server
            }
            std::thread::sleep(Duration::from_millis(1500));
        }
        false
    });
    std::thread::sleep(Duration::from_millis(200));
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (code, took) = get(addr, path);
        assert!(code == 200 || code == 503, "{path}: {code}");
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
    }
    // the slow client is cut off at the header deadline
    let t = Instant::now();
    assert!(
        dripping.join().unwrap(),
        "the slow client was never cut off"
    );
    assert!(t.elapsed() < HEADER_READ_TIMEOUT + Duration::from_secs(3));
    drop(idle);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// GET `path` from the local address `from` (any 127.x.y.z is local).
fn get_from(from: &str, addr: SocketAddr, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{from}:0").parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, t.elapsed())
}

#[test]
fn a_client_flooding_idle_connections_cannot_keep_others_out() {
    let (addr, stop) = endpoint();
    // 300 idle connections from one address: it gets its share, no more
    let flood: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // another client (a health probe) is served at once
    for path in ["/healthz", "/readyz"] {
        let (code, took) = get_from("127.0.0.2", addr, path);
        assert!(code == 200 || code == 503, "{path}: {code}");
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
    }
    drop(flood);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn bad_requests_get_errors_not_a_stalled_server() {
    let (addr, stop) = endpoint();
    // a request head larger than the limit
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = format!(
        "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = s.write_all(big.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    // garbage, a POST, an unknown path
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\x00\x01\x02 nonsense\r\n\r\n").unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"));
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert_eq!(get(addr, "/nope").0, 404);
    assert_eq!(get(addr, "/healthz").0, 200);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// A private CA and a server certificate for 127.0.0.1 signed by it.
fn certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ml-worker test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

const TLS_REGISTRY: &str = r#"
import base64, http.server, json, ssl, sys
want = "Basic " + base64.b64encode(b"apikey:s3cret").decode()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != want:
            self.send_response(401); self.send_header("Content-Length", "0"); self.end_headers(); return
        body = json.dumps({"schema": "\"long\""}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("server.pem", "server.key")
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// POST /admin/reload on an endpoint bound to `address`, with a reload
/// thread that answers every request with "nothing changed".
fn admin_endpoint(address: &str, token: Option<&str>) -> (SocketAddr, Arc<AtomicBool>) {
    use ml_worker::worker::reload::{Reloaded, Request};
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    std::thread::spawn(move || {
        for r in rx {
            if let Some(reply) = r.reply {
                let _ = reply.send(Ok(Reloaded {
                    changes: Vec::new(),
                    swapped: false,
                    took: Duration::ZERO,
                }));
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let admin = Admin {
        reload: Some(tx),
        token: token.map(str::to_string),
    };
    let addr = serve(
        address.parse().unwrap(),
        Arc::new(Metrics::default()),
        admin,
        stop.clone(),
    )
    .unwrap();
    (addr, stop)
}

fn post(addr: SocketAddr, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /admin/reload HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out)
}

#[test]
fn admin_reload_answers_loopback_without_a_token_and_elsewhere_only_with_one() {
    // loopback, no token: allowed
    let (addr, stop) = admin_endpoint("127.0.0.1:0", None);
    let (code, out) = post(addr, "");
    assert_eq!(code, 200, "{out}");
    assert!(out.contains("\"result\":\"unchanged\""), "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // every address, no token: refused, saying what to set
    let (addr, stop) = admin_endpoint("0.0.0.0:0", None);
    let local = SocketAddr::from(([127, 0, 0, 1], addr.port()));
    let (code, out) = post(local, "");
    assert_eq!(code, 403, "{out}");
    assert!(out.contains("reload.token"), "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // every address, a token: only the right bearer passes
    let token = "0123456789abcdef-secret";
    let (addr, stop) = admin_endpoint("0.0.0.0:0", Some(token));
    let local = SocketAddr::from(([127, 0, 0, 1], addr.port()));
    assert_eq!(post(local, "").0, 401);
    assert_eq!(
        post(local, "Authorization: Bearer 0123456789abcdef-secreT\r\n").0,
        401
    );
    assert_eq!(
        post(
            local,
            "Authorization: Basic MDEyMzQ1Njc4OWFiY2RlZi1zZWNyZXQ=\r\n"
        )
        .0,
        401
    );
    let (code, out) = post(local, &format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(code, 200, "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // a registry that cannot be reloaded says so
    let (addr, stop) = endpoint();
    let (code, out) = post(addr, "");
    assert_eq!(code, 409, "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn the_schema_registry_client_speaks_https_with_a_private_ca_and_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let mut server = std::process::Command::new("python3")
        .args(["-c", TLS_REGISTRY])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    {
        use std::io::BufRead;
        let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
        out.read_line(&mut port).unwrap();
    }
    let url = format!("https://127.0.0.1:{}", port.trim());
    let config = |user: Option<&str>, password: Option<&str>, ca: bool| SchemaRegistryConfig {
        url: url.clone(),
        username: user.map(str::to_string),
        password: password.map(str::to_string),
        ca_file: ca.then(|| dir.path().join("ca.pem")),
        timeout: Duration::from_secs(5),
    };
    let ok = SchemaRegistry::new(&config(Some("apikey"), Some("s3cret"), true)).unwrap();
    assert_eq!(ok.schema(1).unwrap(), "\"long\"");
    // a wrong password is the registry's answer, not an outage
    let bad = SchemaRegistry::new(&config(Some("apikey"), Some("wrong"), true)).unwrap();
    assert!(matches!(bad.schema(1), Err(LookupError::Refused(m)) if m.contains("HTTP 401")),);
    // without the private CA the certificate is not trusted
    let untrusted = SchemaRegistry::new(&config(Some("apikey"), Some("s3cret"), false)).unwrap();
    let e = untrusted.schema(1).unwrap_err();
    assert!(matches!(&e, LookupError::Unavailable(_)), "{e}");
    let _ = server.kill();
    let _ = server.wait();
}
