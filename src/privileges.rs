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
        let name = CString::new(user).map_err(|_| format!("invalid user name {user:?}"))?;
        let mut buffer = vec![0 as libc::c_char; LOOKUP_BUFFER];
        // SAFETY: zeroed passwd is a valid out-parameter; getpwnam_r writes into it and into
        // `buffer`, whose length is passed, and sets `found` to it or to null.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        if found.is_null() {
            return Err(match rc {
                0 => format!("milter.user: no user {user:?} on this system"),
                e => format!("milter.user {user:?}: {}", io::Error::from_raw_os_error(e)),
            });
        }
        let gid = match group {
            Some(group) => group_id(group)?,
            None => entry.pw_gid,
        };
        Ok(Identity {
            user: user.to_string(),
            uid: entry.pw_uid,
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

fn group_id(group: &str) -> Result<libc::gid_t, String> {
    let name = CString::new(group).map_err(|_| format!("invalid group name {group:?}"))?;
    let mut buffer = vec![0 as libc::c_char; LOOKUP_BUFFER];
    // SAFETY: as in `Identity::lookup`, for getgrnam_r.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut found = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if found.is_null() {
        return Err(match rc {
            0 => format!("milter.group: no group {group:?} on this system"),
            e => format!(
                "milter.group {group:?}: {}",
                io::Error::from_raw_os_error(e)
            ),
        });
    }
    Ok(entry.gr_gid)
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
