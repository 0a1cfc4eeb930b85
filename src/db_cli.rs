//! `luamilter db …`: admin commands on the configured store (bans, greylist, white- and
//! blacklists, BIND zone export). Parsing is clap's; each command is one store call and a
//! printout, so the daemon and the admin see the same data through the same code.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};

use crate::duration::parse_duration;
use crate::services::store::{List, ListEntry, Store, zone};

/// The `db` subcommands.
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum DbCommand {
    /// List or search banned IPs and domains.
    Bans {
        #[command(subcommand)]
        action: BansAction,
    },
    /// Ban an IP or a domain (`*.example.com` bans every subdomain).
    Ban {
        kind: BanKind,
        key: String,
        /// Why, shown by `bans list`.
        #[arg(long, default_value = "")]
        reason: String,
        /// Lifetime such as "7d"; permanent when omitted.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Lift a ban.
    Unban { kind: BanKind, key: String },
    /// Inspect greylisting.
    Greylist {
        #[command(subcommand)]
        action: GreylistAction,
    },
    /// Edit the whitelist (addresses, domains or IPs).
    Whitelist {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Edit the blacklist (addresses or domains).
    Blacklist {
        #[command(subcommand)]
        action: ListAction,
    },
    /// Write the banned IPs (minus whitelisted ones) as BIND zone data.
    ExportZone {
        /// DNSBL zone name, e.g. "bl.example.org".
        #[arg(long)]
        zone: String,
        /// Default TTL of the records, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u32,
        /// Output file, replaced atomically; standard output when omitted.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Ban kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BanKind {
    Ip,
    Domain,
}

impl BanKind {
    fn list(self) -> List {
        match self {
            BanKind::Ip => List::BannedIp,
            BanKind::Domain => List::BannedDomain,
        }
    }

    fn all(kind: Option<BanKind>) -> Vec<BanKind> {
        kind.map_or_else(|| vec![BanKind::Ip, BanKind::Domain], |k| vec![k])
    }
}

/// `db bans …`
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum BansAction {
    /// Every live ban.
    List {
        #[arg(long)]
        kind: Option<BanKind>,
    },
    /// Bans whose entry or reason contains TEXT (case-insensitive).
    Search {
        text: String,
        #[arg(long)]
        kind: Option<BanKind>,
    },
}

/// `db greylist …`
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum GreylistAction {
    /// Every live triplet: client, sender, recipient, first and last sight, passes.
    List,
}

/// `db whitelist …` and `db blacklist …`
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum ListAction {
    /// Add or replace an entry.
    Add {
        entry: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Lifetime such as "60d"; permanent when omitted.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Remove an entry.
    Remove { entry: String },
    /// Every live entry, or those containing SEARCH.
    List { search: Option<String> },
}

/// Runs one `db` command against `store`, printing to `out`.
pub async fn run_db(
    store: Arc<dyn Store>,
    cmd: DbCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        DbCommand::Bans { action } => {
            let (kind, search) = match action {
                BansAction::List { kind } => (kind, None),
                BansAction::Search { text, kind } => (kind, Some(text)),
            };
            for kind in BanKind::all(kind) {
                let entries = store.list_search(kind.list(), search.as_deref()).await?;
                let label = kind.to_possible_value().map(|v| v.get_name().to_string());
                print_entries(out, label.as_deref(), &entries)?;
            }
        }
        DbCommand::Ban {
            kind,
            key,
            reason,
            ttl,
        } => {
            store.list_add(kind.list(), &key, &reason, ttl).await?;
            writeln!(out, "banned {}", kind.list().normalize(&key)?)?;
        }
        DbCommand::Unban { kind, key } => {
            let removed = store.list_remove(kind.list(), &key).await?;
            let what = if removed { "unbanned" } else { "not banned:" };
            writeln!(out, "{what} {}", kind.list().normalize(&key)?)?;
        }
        DbCommand::Greylist {
            action: GreylistAction::List,
        } => {
            for e in store.greylist_entries().await? {
                writeln!(
                    out,
                    "{}\t{}\t{}\tfirst={}\tlast={}\tpasses={}",
                    e.client,
                    e.sender,
                    e.rcpt,
                    format_time(e.first),
                    format_time(e.last),
                    e.passes
                )?;
            }
        }
        DbCommand::Whitelist { action } => run_list(&*store, List::Whitelist, action, out).await?,
        DbCommand::Blacklist { action } => run_list(&*store, List::Blacklist, action, out).await?,
        DbCommand::ExportZone {
            zone: name,
            ttl,
            out: file,
        } => {
            let text = zone::export_zone(&*store, &name, ttl).await?;
            match file {
                None => out.write_all(text.as_bytes())?,
                Some(path) => {
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, &text)
                        .with_context(|| format!("writing {}", tmp.display()))?;
                    std::fs::rename(&tmp, &path)
                        .with_context(|| format!("replacing {}", path.display()))?;
                }
            }
        }
    }
    Ok(())
}

async fn run_list(
    store: &dyn Store,
    list: List,
    action: ListAction,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match action {
        ListAction::Add { entry, reason, ttl } => {
            store.list_add(list, &entry, &reason, ttl).await?;
            writeln!(out, "added {}", list.normalize(&entry)?)?;
        }
        ListAction::Remove { entry } => {
            let removed = store.list_remove(list, &entry).await?;
            let what = if removed { "removed" } else { "not listed:" };
            writeln!(out, "{what} {}", list.normalize(&entry)?)?;
        }
        ListAction::List { search } => {
            let entries = store.list_search(list, search.as_deref()).await?;
            print_entries(out, None, &entries)?;
        }
    }
    Ok(())
}

/// One line per entry: [kind] entry, added, expires, reason (tab-separated).
fn print_entries(
    out: &mut dyn Write,
    label: Option<&str>,
    entries: &[ListEntry],
) -> std::io::Result<()> {
    for e in entries {
        if let Some(label) = label {
            write!(out, "{label}\t")?;
        }
        let expires = e.expires.map_or_else(|| "never".to_string(), format_time);
        writeln!(
            out,
            "{}\tadded={}\texpires={}\t{}",
            e.entry,
            format_time(e.created),
            expires,
            e.reason
        )?;
    }
    Ok(())
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::format_time;

    #[test]
    fn utc_dates() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_704_459_662_000), "2024-01-05T13:01:02Z");
    }
}
