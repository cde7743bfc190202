"""What no schema checks: the deployment files agree with each other and
with the worker's configuration (make validate-deploy).

- docker-compose.yml: Kafka is the version the tests run (scripts/kafka-broker.sh),
  the worker's config and models are where the mounts put them, Avro has a
  schema registry, metrics listen off loopback on the port Prometheus
  scrapes, the stop grace period outlasts the drain deadline;
- deploy/k8s: the same for the Deployment, plus the KEDA ScaledObject
  (capped at the input topic's partitions, the worker's group and topic),
  probes, security context, every path the worker writes or reads on a
  volume, and every librdkafka_env variable set from a Secret;
- deploy/prometheus: every alert has a unit test that fires it;
- deploy/grafana: every panel query parses (promtool), ids are unique, the
  datasource is the dashboard's variable.

usage: python check_deploy.py REPO_ROOT   (PROMTOOL: the promtool to use)
exit 1 when any check fails; each check prints one line.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile

import yaml

failures = 0


def check(ok, what):
    global failures
    print(("ok    " if ok else "ERROR ") + what)
    if not ok:
        failures += 1
    return ok


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def seconds(duration):
    """Compose durations: 20s, 1m30s, 1500ms."""
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration)):
        total += float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def drain_deadline(worker):
    """Seconds the worker may take to exit after SIGTERM."""
    ms = worker.get("delivery", {}).get("shutdown_timeout_ms", 10000)
    return ms / 1000 + 5


def listen(worker):
    host, _, port = worker.get("metrics", {}).get("address", "127.0.0.1:9100").rpartition(":")
    return host, int(port)


def compose(root):
    c = load_all(os.path.join(root, "docker-compose.yml"))[0]
    s = c["services"]
    broker_script = open(os.path.join(root, "scripts/kafka-broker.sh")).read()
    version = re.search(r'KAFKA_VERSION="\$\{KAFKA_VERSION:-([^}]+)\}"', broker_script).group(1)
    check(s["kafka"]["image"] == f"apache/kafka:{version}",
          f"compose: kafka image {s['kafka']['image']} is the tests' Kafka {version}")
    env = s["kafka"]["environment"]
    check("broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"],
          "compose: kafka is one KRaft node (broker and controller)")

    w = s["ml-worker"]
    cmd = w["command"]
    config = cmd[cmd.index("--config") + 1]
    mounts = {}
    for v in w["volumes"]:
        src, dst = v.split(":")[:2]
        mounts[dst] = src
    host_config = None
    for dst, src in mounts.items():
        if config.startswith(dst + "/"):
            host_config = os.path.normpath(os.path.join(root, src, config[len(dst) + 1:]))
    if not check(host_config and os.path.isfile(host_config),
                 f"compose: ml-worker's --config {config} is a mounted file ({host_config})"):
        return
    worker = load_all(host_config)[0]
    brokers = worker["kafka"]["brokers"].split(",")
    check(all(b.split(":")[0] == "kafka" and b.split(":")[1] == "9092" for b in brokers),
          f"compose: worker brokers {worker['kafka']['brokers']} is the kafka service's internal listener")
    check(worker["input"]["format"] == "avro" and "url" in worker.get("schema_registry", {}),
          "compose: the worker reads avro and names the schema registry")
    check(worker["schema_registry"]["url"].startswith("http://schema-registry:8081"),
          "compose: schema_registry.url is the schema-registry service")
    host, port = listen(worker)
    check(host == "0.0.0.0", f"compose: metrics.address listens on {host} (reachable from Prometheus)")
    check(any(p.endswith(f":{port}") for p in w.get("ports", [])), f"compose: metrics port {port} published")
    check(seconds(w.get("stop_grace_period", "10s")) > drain_deadline(worker),
          f"compose: stop_grace_period {w.get('stop_grace_period')} > drain deadline {drain_deadline(worker):.0f} s")
    registry = os.path.join(os.path.dirname(host_config), worker["registry"])
    models = load_all(registry)[0]["models"]
    for m in models:
        p = m["path"]
        hosted = None
        for dst, src in mounts.items():
            if p.startswith(dst + "/"):
                hosted = os.path.normpath(os.path.join(root, src, p[len(dst) + 1:]))
        check(hosted and os.path.isfile(hosted), f"compose: model {m['name']} file {p} is mounted ({hosted})")
        check(m["kind"] != "torch" or w["build"].get("target") == "runtime-torch",
              f"compose: model {m['name']} ({m['kind']}) runs in the image built ({w['build'].get('target')})")
    audit_dir = os.path.dirname(worker["audit_db"])
    check(audit_dir in mounts and ":" not in mounts[audit_dir] and not mounts[audit_dir].startswith("."),
          f"compose: audit store folder {audit_dir} is a named volume (the root fs is read-only)")

    g = s["generator"]
    gcmd = g["command"] if g.get("entrypoint") == ["ml-worker"] else None
    check(gcmd and gcmd[0] == "produce" and gcmd[gcmd.index("--config") + 1] == config,
          "compose: the generator is `ml-worker produce` on the worker's config")

    p = s["prometheus"]
    pmounts = dict(v.split(":")[:2][::-1] for v in p["volumes"])
    pconf = os.path.join(root, pmounts["/etc/prometheus/prometheus.yml"])
    prom = load_all(pconf)[0]
    targets = [t for sc in prom["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]]
    check(f"ml-worker:{port}" in targets, f"compose: Prometheus scrapes ml-worker:{port}")
    for rf in prom["rule_files"]:
        path = os.path.join("/etc/prometheus", rf)
        hosted = None
        for dst, src in pmounts.items():
            if path.startswith(dst + "/"):
                hosted = os.path.normpath(os.path.join(root, src, path[len(dst) + 1:]))
        check(hosted and os.path.isfile(hosted), f"compose: Prometheus rule file {rf} is mounted ({hosted})")

    gr = s["grafana"]
    gmounts = dict(v.split(":")[:2][::-1] for v in gr["volumes"])
    prov = load_all(os.path.join(root, gmounts["/etc/grafana/provisioning"], "dashboards/ml-worker.yml"))[0]
    path = prov["providers"][0]["options"]["path"]
    check(path in gmounts and os.path.isfile(os.path.join(root, gmounts[path], "ml-worker.json")),
          f"compose: Grafana's dashboard folder {path} holds deploy/grafana/dashboards")
    home = gr["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH", "")
    check(home.startswith(path + "/") and os.path.isfile(os.path.join(root, gmounts[path], home[len(path) + 1:])),
          f"compose: Grafana's home dashboard {home} exists")


def k8s(root):
    d = os.path.join(root, "deploy/k8s")
    docs = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".yaml") and f != "kustomization.yaml":
            for doc in load_all(os.path.join(d, f)):
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    kust = load_all(os.path.join(d, "kustomization.yaml"))[0]
    check(all(os.path.isfile(os.path.join(d, r)) for r in kust["resources"]),
          "k8s: kustomization.yaml lists files that exist")
    check("secrets.example.yaml" not in kust["resources"], "k8s: the example Secrets are not applied")

    dep = docs[("Deployment", "ml-worker")]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    config_path = args[args.index("--config") + 1]
    cm = docs[("ConfigMap", "ml-worker-config")]
    template = cm["data"]["worker.yaml"]
    worker = yaml.safe_load(template)
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    def volume_of(path, mount_list=mounts):
        best = None
        for mp, m in mount_list.items():
            if path.startswith(mp.rstrip("/") + "/") and (best is None or len(mp) > len(best)):
                best = mp
        return best and (best, vols[mount_list[best]["name"]])

    # SIGTERM drain
    grace = pod["terminationGracePeriodSeconds"]
    check(grace > drain_deadline(worker),
          f"k8s: terminationGracePeriodSeconds {grace} > shutdown_timeout_ms + 5 s ({drain_deadline(worker):.0f} s)")
    # metrics, probes
    host, port = listen(worker)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    check(host == "0.0.0.0" and ports.get("metrics") == port,
          f"k8s: metrics.address {host}:{port} is the container's metrics port")
    check(c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["startupProbe"]["httpGet"]["path"] == "/healthz"
          and c["readinessProbe"]["httpGet"]["path"] == "/readyz",
          "k8s: liveness and startup on /healthz, readiness on /readyz")
    check(all(pr["httpGet"]["port"] in ("metrics", port)
              for pr in (c["livenessProbe"], c["readinessProbe"], c["startupProbe"])),
          "k8s: probes on the metrics port")
    # security
    sc, psc = c["securityContext"], pod["securityContext"]
    check(psc.get("runAsNonRoot") and psc.get("runAsUser", 0) != 0 and sc.get("readOnlyRootFilesystem")
          and sc.get("allowPrivilegeEscalation") is False and sc["capabilities"]["drop"] == ["ALL"],
          "k8s: non-root, read-only root filesystem, no privilege escalation, no capabilities")
    check(dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0,
          "k8s: rolling updates never run more consumers than replicas (maxSurge 0)")
    aff = pod["affinity"]["podAntiAffinity"]
    terms = aff.get("preferredDuringSchedulingIgnoredDuringExecution", []) + \
        aff.get("requiredDuringSchedulingIgnoredDuringExecution", [])
    check(any((t.get("podAffinityTerm", t)).get("topologyKey") == "kubernetes.io/hostname" for t in terms),
          "k8s: pod anti-affinity across nodes")
    # config and files on volumes
    cfg_vol = volume_of(config_path)
    check(cfg_vol and cfg_vol[1].get("configMap", {}).get("name") == "ml-worker-config"
          and "subPath" not in mounts[cfg_vol[0]],
          f"k8s: --config {config_path} is ConfigMap ml-worker-config, mounted whole")
    check("initContainers" not in pod, "k8s: no init container (the worker reads secrets itself)")
    reg = volume_of(worker["registry"])
    check(reg and reg[1].get("configMap", {}).get("name") == "ml-worker-models" and "subPath" not in mounts[reg[0]],
          f"k8s: registry {worker['registry']} is ConfigMap ml-worker-models, mounted whole (updates arrive)")
    models = yaml.safe_load(docs[("ConfigMap", "ml-worker-models")]["data"]["models.yaml"])["models"]
    for m in models:
        v = volume_of(m["path"])
        check(v and "persistentVolumeClaim" in v[1], f"k8s: model {m['name']} file {m['path']} is on the models volume")
        check(m["kind"] != "torch" or "torch" in c["image"], f"k8s: model {m['name']} ({m['kind']}) runs in {c['image']}")
    for path in (os.path.dirname(worker["audit_db"]), "/tmp"):
        v = volume_of(path + "/x")
        check(v and not mounts[v[0]].get("readOnly"), f"k8s: {path} is a writable volume")
    for key, value in worker["kafka"].get("librdkafka", {}).items():
        if key.endswith(".location") or key.endswith(".file"):
            v = volume_of(value)
            items = v and [i["path"] for i in v[1].get("secret", {}).get("items", [])]
            check(v and "secret" in v[1] and (not items or os.path.relpath(value, v[0]) in items),
                  f"k8s: librdkafka {key} {value} is a file of a mounted Secret")
    # no secret in the ConfigMap: passwords come from Secrets as variables
    secret_env = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    written = [k for k in worker["kafka"].get("librdkafka", {}) if k.lower().endswith("password")]
    check(not written, f"k8s: no password in the ConfigMap's kafka.librdkafka {written or ''}(kafka.librdkafka_env instead)")
    for key, var in worker["kafka"].get("librdkafka_env", {}).items():
        check(var in secret_env, f"k8s: librdkafka {key} comes from variable {var}, set from a Secret")
    env = {e["name"] for e in c.get("env", [])}
    check(worker["reload"].get("token_env", "ML_WORKER_ADMIN_TOKEN") in env,
          "k8s: the admin token's variable comes from a Secret")
    # selectors
    labels = dep["spec"]["template"]["metadata"]["labels"]
    for kind, name in (("PodDisruptionBudget", "ml-worker"), ("Service", "ml-worker-metrics")):
        sel = docs[(kind, name)]["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        check(all(labels.get(k) == v for k, v in sel.items()), f"k8s: {kind} {name} selects the pods")
    svc = docs[("Service", "ml-worker-metrics")]
    check(svc["spec"]["ports"][0]["targetPort"] in ("metrics", port) and svc["spec"].get("publishNotReadyAddresses"),
          "k8s: metrics Service on the metrics port, not-ready replicas listed")
    # KEDA
    so = docs[("ScaledObject", "ml-worker")]
    spec = so["spec"]
    partitions = int(so["metadata"]["annotations"]["ml-worker/input-partitions"])
    check(spec["maxReplicaCount"] == partitions,
          f"k8s: ScaledObject maxReplicaCount {spec['maxReplicaCount']} = input partitions {partitions}")
    check(1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], "k8s: 1 <= minReplicaCount <= maxReplicaCount")
    check(spec["scaleTargetRef"]["name"] == dep["metadata"]["name"], "k8s: ScaledObject scales the Deployment")
    for t in spec["triggers"]:
        md = t["metadata"]
        check(t["type"] == "kafka", "k8s: KEDA's kafka scaler")
        check(md["consumerGroup"] == worker["kafka"]["group_id"], "k8s: scaler consumerGroup = kafka.group_id")
        check(md["topic"] in worker["input"]["topics"], "k8s: scaler topic is an input topic")
        check(md["bootstrapServers"] == worker["kafka"]["brokers"], "k8s: scaler bootstrapServers = kafka.brokers")
        check(md.get("allowIdleConsumers", "false") == "false", "k8s: no idle consumers (replicas <= partitions)")
        auth = t.get("authenticationRef", {}).get("name")
        check(auth is None or ("TriggerAuthentication", auth) in docs, f"k8s: TriggerAuthentication {auth} exists")


def alerts(root):
    d = os.path.join(root, "deploy/prometheus")
    names = []
    for f in sorted(os.listdir(d)):
        if f.endswith(".yml") and not f.endswith("_test.yml"):
            for g in load_all(os.path.join(d, f))[0]["groups"]:
                names += [r["alert"] for r in g["rules"] if "alert" in r]
    fired = set()
    for f in sorted(os.listdir(d)):
        if f.endswith("_test.yml"):
            for t in load_all(os.path.join(d, f))[0]["tests"]:
                for a in t.get("alert_rule_test", []):
                    if a.get("exp_alerts"):
                        fired.add(a["alertname"])
    for n in names:
        check(n in fired, f"alerts: {n} fires in a unit test")


def grafana(root, promtool):
    d = os.path.join(root, "deploy/grafana/dashboards")
    ds = load_all(os.path.join(root, "deploy/grafana/provisioning/datasources/prometheus.yml"))[0]
    uids = {x["uid"] for x in ds["datasources"]}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".json"):
            continue
        dash = json.load(open(os.path.join(d, f)))
        panels = []
        for p in dash["panels"]:
            panels.append(p)
            panels += p.get("panels", [])
        ids = [p["id"] for p in panels]
        check(len(ids) == len(set(ids)), f"grafana {f}: panel ids are unique")
        variables = {v["name"] for v in dash["templating"]["list"]}
        exprs, empty, elsewhere = [], [], []
        for p in panels:
            for t in p.get("targets", []):
                if not t.get("expr"):
                    empty.append(f"{p['title']}/{t.get('refId')}")
                    continue
                exprs.append((p["title"], t["expr"]))
                src = t.get("datasource", p.get("datasource", {}))
                if not (src.get("uid") in uids or src.get("uid", "").strip("${}") in variables):
                    elsewhere.append(f"{p['title']}/{t.get('refId')}")
        check(not empty, f"grafana {f}: every panel target has a query" + (f": not {empty}" if empty else ""))
        check(not elsewhere, f"grafana {f}: every target queries the provisioned or chosen datasource" + (f": not {elsewhere}" if elsewhere else ""))
        for v in dash["templating"]["list"]:
            q = v.get("query")
            if v["type"] == "query":
                m = re.match(r"label_values\((.*),\s*\w+\)$", q["query"] if isinstance(q, dict) else q)
                if check(m, f"grafana {f}: variable ${v['name']} is label_values(...)"):
                    exprs.append((f"${v['name']}", m.group(1)))
        # promtool parses each query as a recording rule
        subst = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "${__range}": "1h"}
        rules = []
        for i, (title, e) in enumerate(exprs):
            for k, v in subst.items():
                e = e.replace(k, v)
            e = re.sub(r"\$\{?(\w+)\}?", ".*", e)
            rules.append({"record": f"dashboard:query_{i}", "expr": e})
        with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as t:
            yaml.safe_dump({"groups": [{"name": f, "rules": rules}]}, t)
        r = subprocess.run([promtool, "check", "rules", t.name], capture_output=True, text=True)
        os.unlink(t.name)
        check(r.returncode == 0, f"grafana {f}: its {len(exprs)} queries parse (promtool)"
              + ("" if r.returncode == 0 else "\n" + r.stdout + r.stderr))


def main(root):
    promtool = os.environ.get("PROMTOOL", "promtool")
    compose(root)
    k8s(root)
    alerts(root)
    grafana(root, promtool)
    print(f"{failures} failed" if failures else "every consistency check passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
