//! Build ids: a hash of the exact agent image, exchanged in the hello handshake.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;
use xxhash_rust::xxh3::Xxh3;

/// The xxh3-128 hash of a file's bytes, as 32 hex digits.
pub fn of_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Xxh3::new();
    // Below glibc's mmap threshold: a freed 1 MiB buffer would raise it, and later
    // stream buffers would then come from the heap already touched.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// The build id of the running executable (computed once).
pub fn current() -> std::io::Result<&'static str> {
    static ID: OnceLock<String> = OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(id);
    }
    let id = of_file(Path::new("/proc/self/exe"))?;
    Ok(ID.get_or_init(|| id))
}

/// The build id of the image at `path`, cached while its size and mtime do not change.
pub fn of_image(path: &Path) -> std::io::Result<String> {
    type Cache = Mutex<HashMap<PathBuf, (u64, SystemTime, String)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let meta = std::fs::metadata(path)?;
    let key = (meta.len(), meta.modified()?);
    let cache = CACHE.get_or_init(Default::default);
    if let Some((len, mtime, id)) = cache.lock().unwrap().get(path) {
        if (*len, *mtime) == key {
            return Ok(id.clone());
        }
    }
    let id = of_file(path)?;
    cache.lock().unwrap().insert(path.to_path_buf(), (key.0, key.1, id.clone()));
    Ok(id)
}
