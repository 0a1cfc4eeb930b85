//! One daemon per SQLite database. SQLite itself would let two daemons share the file, but
//! each would run its own expiry and writer thread over the other's data and the operator
//! would not know which one answered: the second daemon is refused at start instead. The lock
//! is an exclusive `flock` on `<database>.lock`, released by the kernel when the daemon exits
//! however it exits. `luamilter db` does not take it: it edits the live database on purpose.

use super::{Backend, StoreConfig, StoreError};
use std::{
    fs::{File, OpenOptions, TryLockError},
    path::PathBuf,
};

/// The held lock; released when dropped.
#[derive(Debug)]
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Takes the lock for the database `config` names (its path already resolved); `None` for
    /// Redis, which several daemons share by design.
    pub fn take(config: &StoreConfig) -> Result<Option<DaemonLock>, StoreError> {
        if config.backend != Backend::Sqlite {
            return Ok(None);
        }
        let mut path = config.path.clone().into_os_string();
        path.push(".lock");
        let path = PathBuf::from(path);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DaemonLock { _file: file })),
            Err(TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
                "another luamilter daemon is using the database {} (it holds {})",
                config.path.display(),
                path.display()
            ))),
            Err(TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
                "cannot lock {}: {e}",
                path.display()
            ))),
        }
    }
}
