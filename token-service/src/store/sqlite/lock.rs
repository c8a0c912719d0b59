//! The lock file that makes this process the database file's one writer.

use std::path::{Path, PathBuf};

use crate::store::StoreError;

/// Takes an exclusive lock on `<path>.lock` (released when the process ends, even by
/// `kill -9`), so two services never share one database file.
pub(super) fn lock_exclusively(path: &Path) -> Result<std::fs::File, StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            StoreError::Unavailable(format!("{}: {e}", PathBuf::from(&lock_path).display()))
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another process (one service per SQLite file; several \
             replicas need store.kind = \"postgres\")",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "{}: {e}",
            PathBuf::from(&lock_path).display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use crate::store::StoreError;
    use crate::store::sqlite::{SqliteStore, SyncMode};

    #[test]
    fn a_second_process_cannot_open_the_same_file() {
        let store = SqliteStore::temporary().unwrap();
        let path = store.inner.temporary.clone().unwrap().join("jobtoken.db");
        let second = SqliteStore::open(&path, SyncMode::Normal, 10);
        assert!(
            matches!(&second, Err(StoreError::Unavailable(why)) if why.contains("another process")),
            "{second:?}"
        );
        drop(store);
        // Once the first is closed, the file opens again.
        let dir = path.parent().unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let reopened = SqliteStore::open(&path, SyncMode::Normal, 10).unwrap();
        drop(reopened);
        let _ = std::fs::remove_dir_all(dir);
    }
}
