//! File system helpers shared by the local backend: atomic replacement of a file, directory
//! fsync, and advisory lock files that work across processes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use fs4::fs_std::FileExt;

/// Files whose name starts with this are unfinished writes; a crash may leave them behind.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// A unique temporary path in the same directory as `target`, so that a rename onto the target
/// stays within one file system and is atomic.
pub(crate) fn temp_path_for(target: &Path) -> PathBuf {
    let dir = target.parent().unwrap_or_else(|| Path::new("."));
    // The process id and a random number keep concurrent writers (threads or processes) apart.
    dir.join(format!(
        "{TEMP_PREFIX}{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Replaces `target` with `bytes` atomically: readers see the old or the new content, never a
/// mix. With `fsync`, the content and the directory entry are durable when this returns.
pub(crate) fn write_atomic(target: &Path, bytes: &[u8], fsync: bool) -> io::Result<()> {
    let temp = temp_path_for(target);
    let result = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        if fsync {
            file.sync_all()?;
        }
        fs::rename(&temp, target)
    })();
    if result.is_err() {
        // Best effort: the temp file is garbage either way, and open() cleans leftovers.
        let _ = fs::remove_file(&temp);
    }
    result?;
    if fsync {
        sync_dir(target.parent().unwrap_or_else(|| Path::new(".")))?;
    }
    Ok(())
}

/// Makes a directory's entries (created, renamed, removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    // Windows cannot open a directory as a file; NTFS journals renames itself.
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// An exclusive advisory lock on a file, released when dropped (closing the file releases it,
/// also when the process dies).
///
/// The lock is `flock`-style: held per open file, so two handles in one process exclude each
/// other just as two processes do.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }

    /// Waits for the lock.
    pub(crate) fn lock(path: &Path) -> io::Result<Self> {
        let file = Self::open(path)?;
        FileExt::lock_exclusive(&file)?;
        Ok(Self { _file: file })
    }

    /// Takes the lock if it is free.
    pub(crate) fn try_lock(path: &Path) -> io::Result<Option<Self>> {
        let file = Self::open(path)?;
        if FileExt::try_lock_exclusive(&file)? {
            Ok(Some(Self { _file: file }))
        } else {
            Ok(None)
        }
    }
}

/// Removes every file whose name starts with [`TEMP_PREFIX`] under `dir`, recursively. Returns
/// how many were removed.
pub(crate) fn remove_temp_files(dir: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            removed += remove_temp_files(&entry.path())?;
        } else if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                // Another cleaner or the writer's own rename got there first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f.json");
        write_atomic(&target, b"one", true).unwrap();
        write_atomic(&target, b"two", false).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.json"]);
    }

    #[test]
    fn a_held_lock_is_not_taken_twice_in_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let held = FileLock::try_lock(&path).unwrap().expect("free lock");
        assert!(FileLock::try_lock(&path).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_lock(&path).unwrap().is_some());
    }

    #[test]
    fn temp_files_are_removed_recursively_and_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/.tmp-1-2"), b"x").unwrap();
        fs::write(dir.path().join(".tmp-3"), b"x").unwrap();
        fs::write(dir.path().join("a/keep.json"), b"x").unwrap();
        assert_eq!(remove_temp_files(dir.path()).unwrap(), 2);
        assert!(dir.path().join("a/keep.json").exists());
    }
}
