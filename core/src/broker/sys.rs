//! Thin wrappers over the few syscalls the broker needs.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Puts `fd` in non-blocking mode.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a valid, borrowed descriptor.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `read(2)` into `buf`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `writev(2)` of `bufs` (at most 64 are used).
pub fn writev(fd: BorrowedFd<'_>, bufs: &[&[u8]]) -> io::Result<usize> {
    let mut iov: [libc::iovec; 64] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 64];
    let n = bufs.len().min(64);
    for (slot, b) in iov.iter_mut().zip(bufs) {
        slot.iov_base = b.as_ptr() as *mut _;
        slot.iov_len = b.len();
    }
    // SAFETY: the first n iovecs point into live slices.
    let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Sends `sig` to process `pid`; a process that is already gone is not an error.
pub fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall; pid comes from a Child we own and have not reaped yet.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}
