//! Build ids: a hash of the exact agent image, exchanged in the hello handshake; and the
//! image as shipped to a bootstrapped target.
//!
//! An ELF executable is shipped cut after its last byte that a program header maps (as
//! `sstrip` does): the symbol table, debug info and section headers after it are never
//! loaded, and dropping them makes a release image about a quarter smaller and a debug
//! one about seven times smaller. The build id hashes that shipped form, so an agent
//! running from the cut image and a local child running the full file agree; cutting is
//! idempotent. Anything that is not a well-formed ELF file is shipped and hashed as is.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;
use xxhash_rust::xxh3::Xxh3;

/// Where the shipped form of an ELF file ends, and its ELF header with the section-header
/// fields (`e_shoff`, `e_shnum`, `e_shstrndx`) zeroed: they would point past the end.
#[derive(Debug, PartialEq, Eq)]
struct Cut {
    end: u64,
    header: Vec<u8>,
}

/// Reads the ELF and program headers of `f` (`len` bytes); `None` when it is not a
/// well-formed ELF file.
fn cut(f: &mut std::fs::File, len: u64) -> std::io::Result<Option<Cut>> {
    let mut ehdr = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    if len < 64 || f.read_exact(&mut ehdr).is_err() || ehdr[..4] != *b"\x7fELF" {
        return Ok(None);
    }
    let be = match ehdr[5] {
        1 => false,
        2 => true,
        _ => return Ok(None),
    };
    let int = |b: &[u8]| {
        b.iter()
            .enumerate()
            .fold(0u64, |v, (i, x)| v | u64::from(*x) << (8 * if be { b.len() - 1 - i } else { i }))
    };
    // (ELF header size, e_phoff, e_phentsize, e_phnum, e_shoff, p_offset, p_filesz), as
    // (offset, width) pairs for the class.
    let (ehsize, phoff, phentsize, phnum, sh, p_offset, p_filesz) = match ehdr[4] {
        1 => (52, (0x1c, 4), 0x2a, 0x2c, [(0x20, 4), (0x30, 2), (0x32, 2)], (4, 4), (16, 4)),
        2 => (64, (0x20, 8), 0x36, 0x38, [(0x28, 8), (0x3c, 2), (0x3e, 2)], (8, 8), (32, 8)),
        _ => return Ok(None),
    };
    let field = |(at, w): (usize, usize)| int(&ehdr[at..at + w]);
    let (off, entsize, num) = (field(phoff), field((phentsize, 2)), field((phnum, 2)));
    let table = off.checked_add(entsize * num).filter(|&e| e <= len);
    let (Some(table_end), true) = (table, num > 0 && entsize >= p_filesz.0 as u64 + p_filesz.1 as u64) else {
        return Ok(None);
    };
    let mut phdrs = vec![0u8; (entsize * num) as usize];
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(&mut phdrs)?;
    let mut end = table_end.max(ehsize);
    for ph in phdrs.chunks_exact(entsize as usize) {
        let get = |(at, w): (usize, usize)| int(&ph[at..at + w]);
        match get(p_offset).checked_add(get(p_filesz)) {
            Some(e) if e <= len => end = end.max(e),
            _ => return Ok(None),
        }
    }
    let mut header = ehdr[..ehsize as usize].to_vec();
    for (at, w) in sh {
        header[at..at + w].fill(0);
    }
    Ok(Some(Cut { end, header }))
}

/// The bytes shipped for the image at `path`: an ELF executable cut after its last loaded
/// byte, anything else as is.
pub fn shipped(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let cut = cut(&mut f, len)?;
    f.seek(SeekFrom::Start(0))?;
    let mut bytes = Vec::with_capacity(cut.as_ref().map_or(len, |c| c.end) as usize);
    f.take(cut.as_ref().map_or(len, |c| c.end)).read_to_end(&mut bytes)?;
    if let Some(c) = cut {
        bytes[..c.header.len()].copy_from_slice(&c.header);
    }
    Ok(bytes)
}

/// The xxh3-128 hash of the shipped form of a file (see the module docs), as 32 hex
/// digits.
pub fn of_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Xxh3::new();
    let (start, end) = match cut(&mut f, len)? {
        Some(c) => {
            h.update(&c.header);
            (c.header.len() as u64, c.end)
        }
        None => (0, len),
    };
    f.seek(SeekFrom::Start(start))?;
    let mut f = f.take(end - start);
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

/// The running executable's build id, once known.
static CURRENT: OnceLock<String> = OnceLock::new();

/// The build id of the running executable (computed once).
pub fn current() -> std::io::Result<&'static str> {
    if let Some(id) = CURRENT.get() {
        return Ok(id);
    }
    let id = of_file(Path::new("/proc/self/exe"))?;
    Ok(CURRENT.get_or_init(|| id))
}

/// Takes `id` as the running executable's build id, for an agent whose image its parent
/// sent over the stream and hashed: hashing it again here would cost a read of the whole
/// image on every start.
pub(crate) fn adopt(id: String) -> &'static str {
    CURRENT.get_or_init(|| id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh private folder for one test.
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mitogen-build-id-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn an_elf_executable_ships_cut_runs_and_keeps_its_build_id() {
        let exe = std::env::current_exe().unwrap();
        let full = std::fs::metadata(&exe).unwrap().len();
        let bytes = shipped(&exe).unwrap();
        // A test binary carries debug info and a symbol table: both go.
        assert!((bytes.len() as u64) < full, "{} of {full} bytes", bytes.len());
        let dir = scratch("cut");
        let cut = dir.join("cut");
        std::fs::write(&cut, &bytes).unwrap();
        std::fs::set_permissions(&cut, std::fs::Permissions::from_mode(0o700)).unwrap();
        // Idempotent: the cut image hashes and ships as itself.
        assert_eq!(of_file(&cut).unwrap(), of_file(&exe).unwrap());
        assert_eq!(shipped(&cut).unwrap(), bytes);
        // The kernel and the dynamic loader take it.
        let out = mitogen_transport_local::output(std::process::Command::new(&cut).arg("--list")).unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("an_elf_executable_ships_cut"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn anything_else_ships_as_is() {
        let dir = scratch("as-is");
        let mut elf_like = b"\x7fELF\x02\x01\x01".to_vec();
        elf_like.resize(64, 0);
        // A program header table said to lie past the end of the file.
        elf_like[0x20] = 0xff;
        elf_like[0x36] = 56;
        elf_like[0x38] = 1;
        for (name, bytes) in
            [("script", b"#!/bin/sh\necho hi\n".to_vec()), ("short", b"\x7fELF".to_vec()), ("bad", elf_like)]
        {
            let p = dir.join(name);
            std::fs::write(&p, &bytes).unwrap();
            assert_eq!(shipped(&p).unwrap(), bytes, "{name}");
            assert_eq!(
                of_file(&p).unwrap(),
                format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes)),
                "{name}"
            );
        }
    }
}
