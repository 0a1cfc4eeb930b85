//! Opening a client stream to a milter socket as an MTA does.

use indymilter::EitherStream;
use luamilter_vocab::ListenAddr;
use std::io;
use tokio::net::{TcpStream, UnixStream};

/// A stream to a milter over TCP or a UNIX socket.
pub type MilterStream = EitherStream<TcpStream, UnixStream>;

/// Opens a stream to the milter; TCP streams get `TCP_NODELAY`, as an MTA that wants low
/// latency sets it.
pub async fn connect(addr: &ListenAddr) -> io::Result<MilterStream> {
    match addr {
        ListenAddr::Unix(path) => UnixStream::connect(path).await.map(EitherStream::Unix),
        ListenAddr::Inet(sa) => {
            let stream = TcpStream::connect(sa).await?;
            stream.set_nodelay(true)?;
            Ok(EitherStream::Tcp(stream))
        }
    }
}
