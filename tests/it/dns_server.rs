//! A real authoritative DNS server for tests: hickory-server on 127.0.0.1 (an ephemeral port,
//! UDP and TCP) serving every zone file in `tests/fixtures/zones/` (`<origin>.zone`).
//!
//! Besides the zones it answers SERVFAIL for every name under `servfail.test.` and REFUSED for
//! names outside its zones (e.g. `outside.nowhere.`). [`TestDns::with_delay`] holds every answer
//! back; [`TestDns::silent`] binds a socket that never answers (for timeouts), and
//! [`TestDns::servfail`] and [`TestDns::garbage`] one that answers every query with SERVFAIL or
//! with bytes that are no DNS message; [`TestDns::with_records`] adds records whose names no
//! zone file can spell.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::op::ResponseCode;
use hickory_server::proto::rr::{LowerName, Name, Record};
use hickory_server::proto::serialize::txt::Parser;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AxfrPolicy, Catalog, MessageResponseBuilder, ZoneHandler, ZoneType,
};
use luamilter::services::dns::{DnsConfig, Resolver};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

/// A running test DNS server; it stops when dropped.
pub struct TestDns {
    /// Where it listens (UDP and TCP).
    pub addr: SocketAddr,
    running: Running,
}

enum Running {
    Server(Server<TestHandler>),
    Raw(JoinHandle<()>),
}

impl TestDns {
    /// Starts a server that answers at once.
    pub async fn start() -> TestDns {
        Self::with_delay(Duration::ZERO).await
    }

    /// Starts a server that waits `delay` before each answer (concurrently per query).
    pub async fn with_delay(delay: Duration) -> TestDns {
        Self::serve(delay, Vec::new()).await
    }

    /// Starts a server that answers at once and also serves `records`, each in the fixture zone
    /// its name falls in: for names a zone file cannot spell (the zone parser reads owner names
    /// through IDNA, which refuses `:`, `/`, `%` and spaces, however escaped).
    pub async fn with_records(records: Vec<Record>) -> TestDns {
        Self::serve(Duration::ZERO, records).await
    }

    async fn serve(delay: Duration, records: Vec<Record>) -> TestDns {
        let handler = TestHandler {
            catalog: load_catalog(&zones_dir(), records),
            delay,
        };
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("UDP address");
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        TestDns {
            addr,
            running: Running::Server(server),
        }
    }

    /// Binds a UDP socket that reads every query and never answers.
    pub async fn silent() -> TestDns {
        Self::raw(|_| None).await
    }

    /// Answers every query with SERVFAIL.
    pub async fn servfail() -> TestDns {
        Self::raw(|query| {
            let mut answer = query.to_vec();
            // QR (response) and RA set, RCODE 2 (SERVFAIL); the question stays.
            answer[2] |= 0x80;
            answer[3] = 0x80 | 2;
            Some(answer)
        })
        .await
    }

    /// Answers every query with its own ID followed by bytes that are no DNS message.
    pub async fn garbage() -> TestDns {
        Self::raw(|query| {
            let mut answer = query[..2].to_vec();
            answer.extend((0..40u8).map(|i| i.wrapping_mul(97) ^ 0x5a));
            Some(answer)
        })
        .await
    }

    /// An address where nothing listens: its socket was bound and closed again, so queries
    /// meet ICMP port unreachable.
    pub async fn unreachable() -> SocketAddr {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
        udp.local_addr().expect("UDP address")
    }

    /// A UDP socket that answers each query (of at least a header) with `respond`'s bytes, or
    /// not at all for `None`.
    async fn raw(respond: fn(&[u8]) -> Option<Vec<u8>>) -> TestDns {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
        let addr = udp.local_addr().expect("UDP address");
        let task = tokio::spawn(async move {
            let mut buffer = [0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buffer).await {
                if let Some(answer) = (n >= 12).then(|| respond(&buffer[..n])).flatten() {
                    let _ = udp.send_to(&answer, from).await;
                }
            }
        });
        TestDns {
            addr,
            running: Running::Raw(task),
        }
    }

    /// A resolver configuration pointing at this server only: 1 attempt, `timeout` per query.
    pub fn config(&self, timeout: Duration) -> DnsConfig {
        DnsConfig {
            nameservers: vec![self.addr],
            timeout,
            attempts: 1,
            ..DnsConfig::default()
        }
    }

    /// A resolver using [`config`](Self::config) with a 2 s timeout.
    pub fn resolver(&self) -> Arc<Resolver> {
        Arc::new(Resolver::new(&self.config(Duration::from_secs(2))).expect("resolver"))
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        match &self.running {
            Running::Server(server) => server.shutdown_token().cancel(),
            Running::Raw(task) => task.abort(),
        }
    }
}

/// Binds UDP and TCP on one ephemeral port of 127.0.0.1, retrying when the TCP side of the
/// port the kernel picked for UDP is taken (other tests' sockets use ephemeral ports too).
async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
        let addr = udp.local_addr().expect("UDP address");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port of 127.0.0.1 was free for both UDP and TCP");
}

/// The directory of the fixture zone files.
fn zones_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zones")
}

/// Loads every `<origin>.zone` file of `dir` into a catalog, with the `extra` records of each.
fn load_catalog(dir: &Path, mut extra: Vec<Record>) -> Catalog {
    let mut catalog = Catalog::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("zone directory")
        .map(|entry| entry.expect("zone directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "zone"))
        .collect();
    entries.sort();
    for path in entries {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("zone file name");
        let origin = Name::from_ascii(format!("{stem}.")).expect("zone origin");
        let text = std::fs::read_to_string(&path).expect("zone file");
        let (origin, records) = Parser::new(text, Some(path.clone()), Some(origin))
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::new(
            origin.clone(),
            records,
            ZoneType::Primary,
            AxfrPolicy::Deny,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (inside, outside) = extra.into_iter().partition(|r| origin.zone_of(&r.name));
        extra = outside;
        for record in inside {
            zone.upsert_mut(record, 1);
        }
        let zone: Arc<dyn ZoneHandler> = Arc::new(zone);
        catalog.upsert(LowerName::from(origin), vec![zone]);
    }
    assert!(extra.is_empty(), "records outside every zone: {extra:?}");
    catalog
}

/// The catalog plus the test behaviours (delay, SERVFAIL zone).
struct TestHandler {
    catalog: Catalog,
    delay: Duration,
}

#[async_trait::async_trait]
impl RequestHandler for TestHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let servfail = request
            .request_info()
            .is_ok_and(|info| info.query.name().to_string().ends_with("servfail.test."));
        if !servfail {
            return self
                .catalog
                .handle_request::<R, T>(request, response_handle)
                .await;
        }
        let response = MessageResponseBuilder::new(&request.queries, None)
            .error_msg(&request.metadata, ResponseCode::ServFail);
        response_handle
            .send_response(response)
            .await
            .expect("send SERVFAIL")
    }
}
