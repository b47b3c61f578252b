//! Bytes kept in an in-memory file (memfd), mapped read-only: code reads them as
//! ordinary `Bytes`, and a door writing them to a plain TCP socket can hand the
//! kernel the file instead (`sendfile`), which attaches its pages to the socket
//! without the copy a `write` makes. That copy was the largest single cost of a
//! 64 KiB hot hit (17% of the gateway's time), and the one nginx's `sendfile`
//! does not pay.
//!
//! A response whose body is such bytes carries a [`Sendable`] in its extensions;
//! the door matches the slices hyper asks it to write against the mapping's
//! address range. The `Sendable` holds the mapping, so the range cannot be
//! unmapped and reused by other memory while a door still compares against it.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use bytes::Bytes;
use rustix::fs::{memfd_create, MemfdFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};

/// Below this size a copy costs less than a file's set-up and a second syscall.
pub const MIN_SIZE: usize = 16 * 1024;

/// A read-only mapping of a whole memfd.
struct Mapping {
    file: OwnedFd,
    ptr: *mut std::ffi::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and never changes while it exists; it is
// unmapped only when the last owner drops.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `Sendable::copy_of` with this pointer and length.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

/// Where a body's bytes can be sent from: the memfd and the address range its
/// mapping occupies.
#[derive(Clone)]
pub struct Sendable(Arc<Mapping>);

impl Sendable {
    /// `bytes` copied into a new memfd: the mapped copy (to keep and answer
    /// with) and its `Sendable`. `None` if the system refuses one (the caller
    /// keeps `bytes` as they are).
    pub fn copy_of(bytes: &[u8]) -> Option<(Bytes, Sendable)> {
        if bytes.is_empty() {
            return None;
        }
        let file = memfd_create("moonbit-registry-hot", MemfdFlags::CLOEXEC).ok()?;
        let mut writer = std::fs::File::from(file);
        writer.write_all(bytes).ok()?;
        let file = OwnedFd::from(writer);
        // SAFETY: a fresh shared read-only mapping of a file we own; nothing else
        // writes to the memfd.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                bytes.len(),
                ProtFlags::READ,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .ok()?;
        let mapping = Arc::new(Mapping {
            file,
            ptr,
            len: bytes.len(),
        });
        let sendable = Sendable(mapping.clone());
        Some((Bytes::from_owner(Owner(mapping)), sendable))
    }

    /// The file offset of `slice` if it lies wholly within this mapping.
    pub fn offset_of(&self, slice: &[u8]) -> Option<u64> {
        let base = self.0.ptr as usize;
        let start = slice.as_ptr() as usize;
        let end = start.checked_add(slice.len())?;
        (start >= base && end <= base + self.0.len && !slice.is_empty())
            .then(|| (start - base) as u64)
    }

    pub fn file(&self) -> BorrowedFd<'_> {
        self.0.file.as_fd()
    }
}

/// What keeps the mapping alive behind the `Bytes`.
struct Owner(Arc<Mapping>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapped_copy_reads_the_same_and_only_its_slices_have_offsets() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (bytes, sendable) = Sendable::copy_of(&data).expect("memfd");
        assert_eq!(&bytes[..], &data[..]);
        assert_eq!(sendable.offset_of(&bytes[..]), Some(0));
        assert_eq!(sendable.offset_of(&bytes[4096..5000]), Some(4096));
        assert_eq!(sendable.offset_of(&data[..]), None);
        assert_eq!(sendable.offset_of(&bytes[..0]), None);
        // The file holds the same bytes.
        let mut read = vec![0u8; 10];
        rustix::io::pread(sendable.file(), &mut read, 4096).unwrap();
        assert_eq!(&read[..], &data[4096..4106]);
        drop(sendable);
        assert_eq!(bytes.len(), data.len());
        assert_eq!(bytes[99_999], data[99_999]);
    }
}
