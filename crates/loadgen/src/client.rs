//! The MTA side of one milter connection: framing, option negotiation, and
//! buffered writes that are flushed only when a reply is awaited, as Postfix's
//! buffered stream does (commands whose replies were negotiated away travel
//! together with the next command that expects one). [`Connection::event`]
//! sends one stage the way Postfix's `milter8_event` does; it works over any
//! byte stream ([`Connection::negotiate`]), so an in-process milter can be
//! driven too (`luamilter test`).

use super::endpoint::{self, MilterStream};
use indymilter::{
    Actions, ProtoOpts,
    message::{
        self, PROTOCOL_VERSION,
        command::{Command, OptNegPayload},
        reply::Reply,
    },
};
use luamilter_vocab::{ListenAddr, Stage};
use std::{io, time::Duration};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream},
    time::timeout,
};

/// Buffer sizes: the small commands of a message fit; a 64 KiB body chunk
/// bypasses the write buffer (after what is queued before it).
const WRITE_BUFFER: usize = 16 * 1024;
const READ_BUFFER: usize = 8 * 1024;

/// Why a milter connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Opening the socket failed.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// Reading or writing failed, or the milter closed the connection.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// No reply came within the configured time.
    #[error("timed out waiting for the milter")]
    Timeout,
    /// The milter sent bytes that are not a milter reply.
    #[error("unparsable reply from the milter")]
    BadReply,
    /// The milter sent a reply that makes no sense at this point.
    #[error("unexpected reply {reply} at {stage}")]
    Unexpected { reply: String, stage: &'static str },
    /// Negotiation asked for something the MTA did not offer.
    #[error("negotiation refused: {0}")]
    Negotiation(String),
}

/// An open, negotiated milter connection over a socket (`MilterStream`) or any
/// other byte stream.
pub struct Connection<S = MilterStream> {
    stream: BufStream<S>,
    timeout: Duration,
    /// Actions the milter asked for.
    pub actions: Actions,
    /// Protocol options the milter asked for (skipped stages, NOREPLY stages, ...).
    pub opts: ProtoOpts,
}

impl Connection {
    /// Connects and negotiates like Postfix: protocol 6, every action and every
    /// protocol option offered.
    pub async fn open(endpoint: &ListenAddr, wait: Duration) -> Result<Self, ClientError> {
        let stream = timeout(wait, endpoint::connect(endpoint))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ClientError::Connect)?;
        Self::negotiate(stream, wait).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Negotiates like Postfix on an open stream: protocol 6, every action and
    /// every protocol option offered. `wait` bounds every later reply.
    pub async fn negotiate(stream: S, wait: Duration) -> Result<Self, ClientError> {
        let mut conn = Self {
            stream: BufStream::with_capacity(READ_BUFFER, WRITE_BUFFER, stream),
            timeout: wait,
            actions: Actions::empty(),
            opts: ProtoOpts::empty(),
        };
        conn.send(Command::OptNeg(OptNegPayload {
            version: PROTOCOL_VERSION,
            actions: Actions::all(),
            opts: ProtoOpts::all(),
        }))
        .await?;
        match conn.reply().await? {
            Reply::OptNeg {
                version,
                actions,
                opts,
                ..
            } => {
                if !(2..=PROTOCOL_VERSION).contains(&version) {
                    return Err(ClientError::Negotiation(format!(
                        "protocol version {version}"
                    )));
                }
                conn.actions = actions;
                conn.opts = opts;
                Ok(conn)
            }
            other => Err(unexpected(&other, "negotiate")),
        }
    }

    /// Queues a command; it is written when a reply is awaited or the buffer fills.
    pub async fn send(&mut self, cmd: Command) -> Result<(), ClientError> {
        let msg = cmd.into_message();
        let len = u32::try_from(msg.buffer.len() + 1)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.stream.write_u32(len).await?;
        self.stream.write_u8(msg.kind).await?;
        self.stream.write_all(&msg.buffer).await?;
        Ok(())
    }

    /// Flushes queued commands and reads the next reply, passing over
    /// `progress` replies as an MTA does.
    pub async fn reply(&mut self) -> Result<Reply, ClientError> {
        let wait = self.timeout;
        let read = async {
            self.stream.flush().await?;
            loop {
                let msg = message::read(&mut self.stream).await?;
                match Reply::parse_reply(msg) {
                    Ok(Reply::Progress) => continue,
                    Ok(reply) => return Ok(reply),
                    Err(_) => return Err(ClientError::BadReply),
                }
            }
        };
        timeout(wait, read)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Sends one event the way Postfix's `milter8_event` does: the stage's
    /// macros first (even for a stage the milter negotiated away), then the
    /// command unless the stage is skipped, and waits for the reply unless the
    /// stage was negotiated NOREPLY. `None` when no reply is due.
    pub async fn event(
        &mut self,
        stage: Stage,
        macros: Option<Command>,
        cmd: Command,
    ) -> Result<Option<Reply>, ClientError> {
        let (skipped, noreply) = stage.protocol_flags();
        if let Some(macros) = macros {
            self.send(macros).await?;
        }
        if self.opts.contains(skipped) {
            return Ok(None);
        }
        self.send(cmd).await?;
        if self.opts.contains(noreply) {
            return Ok(None);
        }
        self.reply().await.map(Some)
    }

    /// Sends QUIT and closes the connection.
    pub async fn quit(mut self) -> Result<(), ClientError> {
        self.send(Command::Quit).await?;
        self.stream.flush().await?;
        self.stream.shutdown().await?;
        Ok(())
    }

    /// Sends QUIT and waits (at most the reply timeout) until the milter has
    /// closed its side, that is, until it has finished with the connection.
    pub async fn quit_and_wait(&mut self) -> Result<(), ClientError> {
        self.send(Command::Quit).await?;
        let wait = self.timeout;
        let drained = async {
            self.stream.flush().await?;
            let mut sink = [0u8; 512];
            while self.stream.read(&mut sink).await? > 0 {}
            Ok::<(), io::Error>(())
        };
        timeout(wait, drained)
            .await
            .map_err(|_| ClientError::Timeout)??;
        Ok(())
    }
}

/// The error for a reply that does not fit the stage.
pub fn unexpected(reply: &Reply, stage: &'static str) -> ClientError {
    let mut reply = format!("{reply:?}");
    reply.truncate(80);
    ClientError::Unexpected { reply, stage }
}
