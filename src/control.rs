//! The control socket behind `luamilter ctl`: a unix socket readable by its owner only, one
//! command line per connection (`reload`, `stats`), a text answer; a peer that is neither root
//! nor the daemon's user is refused.

use crate::{engine::Generation, reload::Reloader};
use std::{
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};

/// Longest command line accepted.
const MAX_COMMAND: u64 = 256;
/// How long a client may take to send its command.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A served control socket; the file is removed when this is dropped.
pub struct ControlSocket {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ControlSocket {
    /// Binds `path` (mode 0600; a stale socket file is replaced) and serves commands.
    pub fn serve(path: &Path, reloader: Arc<Reloader>) -> io::Result<ControlSocket> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process serves {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(handle(stream, Arc::clone(&reloader)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(ControlSocket {
            path: path.to_path_buf(),
            task,
        })
    }
}

/// Whether the peer may send commands: root, or the user the daemon runs as. The socket's mode
/// (0600) already keeps others out; this holds when an admin loosened it.
fn refusal(stream: &UnixStream) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let daemon = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(peer) if peer.uid() == 0 || peer.uid() == daemon => None,
        Ok(peer) => Some(format!(
            "error: permission denied: uid {} may not control this daemon (root and uid {daemon} may)\n",
            peer.uid()
        )),
        Err(e) => Some(format!("error: cannot identify the peer: {e}\n")),
    }
}

async fn handle(stream: UnixStream, reloader: Arc<Reloader>) {
    let refused = refusal(&stream);
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_COMMAND));
    let received = tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await;
    let answer = match (refused, received) {
        (Some(refusal), _) => {
            tracing::warn!(
                command = line.trim(),
                answer = refusal.trim_end(),
                "control command refused"
            );
            refusal
        }
        (None, Ok(Ok(_))) => match line.trim() {
            "reload" => reloader.reload("ctl reload").await.to_string(),
            "stats" => stats(&reloader),
            other => format!("error: unknown command {other:?} (commands: reload, stats)\n"),
        },
        (None, Ok(Err(e))) => format!("error: {e}\n"),
        (None, Err(_)) => "error: no command received\n".to_string(),
    };
    let _ = write.write_all(answer.as_bytes()).await;
    let _ = write.shutdown().await;
}

fn stats(reloader: &Reloader) -> String {
    let current = reloader.engine().current();
    let mut out = format!(
        "generation {}\ngenerations_live {}\nvms {}\nconnections {}\nreloads_ok {}\nreloads_failed {}\n",
        current.id,
        Generation::live_count(),
        current.vm_count(),
        current.connection_count(),
        reloader.stats.succeeded.load(Ordering::Relaxed),
        reloader.stats.failed.load(Ordering::Relaxed),
    );
    if let Some(error) = reloader.stats.last_error() {
        out.push_str(&format!(
            "last_reload_error {}\n",
            error.replace('\n', " | ")
        ));
    }
    match crate::metrics::render() {
        // The registry has the shadow counts too (`luamilter_shadow_decisions_total`).
        Some(metrics) => {
            out.push_str("# metrics (the same registry as the Prometheus endpoint)\n");
            out.push_str(&metrics);
        }
        None => {
            for line in crate::engine::shadow::report() {
                out.push_str(&format!("shadow_would {line}\n"));
            }
            out.push_str("# metrics off: set [metrics] listen to record them\n");
        }
    }
    out
}

/// Sends one command to a control socket and returns the answer.
pub async fn request(path: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot reach {}: {e}", path.display())))?;
    stream.write_all(format!("{command}\n").as_bytes()).await?;
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer).await?;
    Ok(answer)
}
