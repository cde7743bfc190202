//! Streamed SHA256 of model files.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

/// Reads a file in 64 KiB chunks, handing each to `chunk` and the hasher;
/// returns the hex SHA256.
fn stream(path: &Path, mut chunk: impl FnMut(&[u8])) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        chunk(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hex SHA256 of a file, never holding more than a chunk of it.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    stream(path, |_| {})
}

/// Reads a whole file, hashing it chunk by chunk as it is read, so the bytes
/// that are verified are exactly the bytes that are then parsed (a file
/// replaced between a hash and a second read cannot slip through).
pub fn read_and_hash(path: &Path) -> io::Result<(Vec<u8>, String)> {
    let mut bytes = Vec::new();
    let sha = stream(path, |c| bytes.extend_from_slice(c))?;
    Ok((bytes, sha))
}

/// Hex SHA256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_bytes_agree_with_the_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), want);
        assert_eq!(sha256_bytes(b"abc"), want);
        assert_eq!(
            read_and_hash(&p).unwrap(),
            (b"abc".to_vec(), want.to_string())
        );
    }
}
