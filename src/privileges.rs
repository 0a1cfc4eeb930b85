//! Running as an unprivileged user under a supervisor other than systemd (`[milter] user` and
//! `group`): the names are resolved at start, the files the daemon keeps using are handed to
//! that user, and after binding and opening the store the process gives up root for good.

use std::{ffi::CString, io, path::Path};

/// The user and group the daemon runs as after start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name, for messages.
    pub user: String,
    /// Its uid.
    pub uid: libc::uid_t,
    /// The group: `[milter] group`, or the user's primary group.
    pub gid: libc::gid_t,
}

/// Scratch space for the `get*nam_r` calls (their entries are small).
const LOOKUP_BUFFER: usize = 16 * 1024;

impl Identity {
    /// Resolves `user` and `group` (the user's primary group when `group` is `None`) through
    /// the system's user database.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<Identity, String> {
        let (uid, primary) = entry("user", user, libc::getpwnam_r, |p: &libc::passwd| {
            (p.pw_uid, p.pw_gid)
        })?;
        let gid = match group {
            Some(group) => entry("group", group, libc::getgrnam_r, |g: &libc::group| g.gr_gid)?,
            None => primary,
        };
        Ok(Identity {
            user: user.to_string(),
            uid,
            gid,
        })
    }

    /// Gives `path` to this user and group (a missing path is skipped).
    pub fn chown(&self, path: &Path) -> io::Result<()> {
        match std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Drops root for good: supplementary groups, then the group, then the user. Every thread
    /// of the process changes with it (glibc applies set*id to all threads).
    pub fn assume(&self) -> io::Result<()> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on integers and a one-element array that outlives them.
        unsafe {
            check(libc::setgroups(1, &self.gid))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
        }
        // SAFETY: getuid/getgid cannot fail.
        if unsafe { (libc::getuid(), libc::getgid()) } != (self.uid, self.gid) {
            return Err(io::Error::other("the user or group did not change"));
        }
        Ok(())
    }
}

/// The signature of `getpwnam_r` and `getgrnam_r`.
type Lookup<T> = unsafe extern "C" fn(
    *const libc::c_char,
    *mut T,
    *mut libc::c_char,
    libc::size_t,
    *mut *mut T,
) -> libc::c_int;

/// Looks `name` up with a `get*nam_r` function and reads what is wanted from the entry while
/// its strings (in the scratch buffer) are alive. `kind` ("user", "group") is for messages.
fn entry<T, R>(
    kind: &str,
    name: &str,
    lookup: Lookup<T>,
    read: impl FnOnce(&T) -> R,
) -> Result<R, String> {
    let text = CString::new(name).map_err(|_| format!("invalid {kind} name {name:?}"))?;
    let mut buffer = vec![0 as libc::c_char; LOOKUP_BUFFER];
    // SAFETY: the entry is plain C data, valid zeroed; the lookup writes into it and into
    // `buffer`, whose length it is given, and sets `found` to the entry or to null.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut found = std::ptr::null_mut();
    let rc = unsafe {
        lookup(
            text.as_ptr(),
            &mut value,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if found.is_null() {
        return Err(match rc {
            0 => format!("milter.{kind}: no {kind} {name:?} on this system"),
            e => format!(
                "milter.{kind} {name:?}: {}",
                io::Error::from_raw_os_error(e)
            ),
        });
    }
    Ok(read(&value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_unknown_names() {
        let root = Identity::lookup("root", None).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let err = Identity::lookup("no-such-user-4711", None).unwrap_err();
        assert!(err.contains("no user \"no-such-user-4711\""), "{err}");
        let err = Identity::lookup("root", Some("no-such-group-4711")).unwrap_err();
        assert!(err.contains("no group \"no-such-group-4711\""), "{err}");
    }
}
