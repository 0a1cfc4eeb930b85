//! The pid file (`[milter] pid_file`) for supervisors other than systemd: written once the
//! sockets are bound, removed at exit, and a start refused while it names a live process.

use std::{
    io,
    path::{Path, PathBuf},
};

/// A written pid file; removed when dropped, if it still holds this process's pid.
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's pid to `path`, unless the file names another process that is
    /// alive. A file naming a dead process (after a crash) is replaced.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        PidFile::refuse_if_running(path)?;
        std::fs::write(path, format!("{}\n", own_pid()))
            .map_err(|e| format!("milter.pid_file {}: cannot write: {e}", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
        })
    }

    /// An error when `path` names another process that is alive (checked again by
    /// [`PidFile::create`]; call it first to refuse before binding anything).
    pub fn refuse_if_running(path: &Path) -> Result<(), String> {
        let at = path.display();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                if let Some(pid) = text.trim().parse::<libc::pid_t>().ok().filter(|p| *p > 0)
                    && pid != own_pid()
                    && alive(pid)
                {
                    return Err(format!(
                        "milter.pid_file {at}: process {pid} is running (another luamilter?); \
                         stop it or remove the file"
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("milter.pid_file {at}: {e}")),
        }
        Ok(())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|text| text.trim().parse() == Ok(own_pid()));
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot remove the pid file (its directory must be writable by milter.user)");
        }
    }
}

fn own_pid() -> libc::pid_t {
    std::process::id() as libc::pid_t
}

/// Whether a process with this pid exists (signal 0 checks without sending anything; EPERM
/// means it exists under another user).
fn alive(pid: libc::pid_t) -> bool {
    // SAFETY: kill with signal 0 only checks for the process.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_refused_while_alive_replaced_when_stale_and_removed() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("luamilter.pid");
        let pid_file = PidFile::create(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(pid_file);
        assert!(!path.exists());
        // pid 1 is always alive.
        std::fs::write(&path, "1\n").unwrap();
        let err = PidFile::create(&path).err().unwrap();
        assert!(err.contains("process 1 is running"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n");
        // A pid beyond pid_max names no process.
        std::fs::write(&path, "2147483646\n").unwrap();
        let _replaced = PidFile::create(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
    }
}
