//! Negotiation: what a generation asks the MTA to send, to wait for, and to grant, derived
//! from what its policies handle and read.

use super::policy::PolicyDecl;
use crate::stage::Stage;
use indymilter::{Actions, MacroStage, ProtoOpts};
use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
};

/// Macros the daemon itself relies on; requested alongside any a policy asks for (an MTA uses a
/// milter's macro list instead of its own defaults).
const CORE_MACROS: &[(MacroStage, &str)] = &[
    (
        MacroStage::Connect,
        "j _ {daemon_name} {daemon_port} {client_addr} {client_name}",
    ),
    (MacroStage::Helo, "{tls_version} {cipher}"),
    (
        MacroStage::Mail,
        "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_mailer}",
    ),
    (MacroStage::Rcpt, "i {rcpt_addr} {rcpt_mailer}"),
    (MacroStage::Eom, "i"),
];

/// What negotiation asks of the MTA for connections of this generation.
pub struct Plan {
    /// Stages the MTA need not send, and other options to ask for (REJECTED_RCPT).
    pub skip: ProtoOpts,
    /// Stages the MTA need not wait for a reply to: those whose handlers are all declared
    /// `noreply`, and those sent only for their data.
    pub noreply: ProtoOpts,
    /// Macros to request per stage (empty: the MTA's defaults).
    pub macros: HashMap<MacroStage, CString>,
    /// Whether sessions keep the message body (a policy `needs` it).
    pub keeps_body: bool,
}

/// The actions luamilter can perform at end of message; requested masked by the MTA's offer.
pub const SUPPORTED_ACTIONS: Actions = Actions::ADD_HEADER
    .union(Actions::CHANGE_HEADER)
    .union(Actions::ADD_RCPT)
    .union(Actions::ADD_RCPT_EXT)
    .union(Actions::DELETE_RCPT)
    .union(Actions::CHANGE_SENDER)
    .union(Actions::REPLACE_BODY)
    .union(Actions::QUARANTINE);

/// The stages negotiation can skip (all but eom, abort and close).
fn skippable_stages() -> impl Iterator<Item = (Stage, ProtoOpts, ProtoOpts)> {
    Stage::ALL.into_iter().filter_map(|stage| {
        let (no, no_reply) = stage.protocol_flags();
        (!no.is_empty()).then_some((stage, no, no_reply))
    })
}

/// Whether `stage` is sent for its data although no policy handles it (without a reply: the MTA
/// queues it with the next command that waits for one). The envelope (connect, HELO, MAIL,
/// RCPT) always is: every policy may read `ctx.client`, `ctx.helo`, `ctx.sender` and
/// `ctx.recipients`, and it costs the MTA one small packet per stage. Headers are, when a policy
/// handles a content stage or reads headers (its source mentions them, or `needs` says so).
fn collected(stage: Stage, decls: &[PolicyDecl]) -> bool {
    match stage {
        Stage::Connect | Stage::Helo | Stage::Mail | Stage::Rcpt => true,
        Stage::Body => decls.iter().any(|d| d.reads_body),
        Stage::Header => decls.iter().any(|d| {
            d.reads_headers
                || d.handles[Stage::Data]
                || d.handles[Stage::Eoh]
                || d.handles[Stage::Body]
        }),
        _ => false,
    }
}

impl Plan {
    /// What to ask of the MTA for a chain of `decls`.
    pub fn from_policies(decls: &[PolicyDecl], delay_reject: bool) -> Plan {
        let mut skip = ProtoOpts::empty();
        let mut noreply = ProtoOpts::empty();
        // A verdict from a declared no-reply handler is owed to the next stage that replies;
        // stages collected after the first such stage reply, so it arrives at once.
        let first_declared = decls.iter().flat_map(|d| d.noreply.iter()).min().copied();
        let collect_noreply = |stage: Stage| first_declared.is_none_or(|first| stage < first);
        for (stage, no, no_reply) in skippable_stages() {
            let handlers: Vec<&PolicyDecl> = decls.iter().filter(|d| d.handles[stage]).collect();
            if handlers.is_empty() {
                if stage == Stage::Data && delay_reject {
                    // Delayed rejects are answered at DATA: it must be sent, with a reply.
                } else if collected(stage, decls) {
                    if collect_noreply(stage) {
                        noreply |= no_reply;
                    }
                } else {
                    skip |= no;
                }
            } else if handlers.iter().all(|d| d.noreply.contains(&stage)) {
                noreply |= no_reply;
            }
        }
        // indymilter (like libmilter) goes from DATA only to a header or to end of headers:
        // when both DATA and headers are sent, a message without headers needs EOH to reach
        // end of message.
        if !skip.contains(ProtoOpts::NO_DATA)
            && !skip.contains(ProtoOpts::NO_HEADER)
            && skip.contains(ProtoOpts::NO_EOH)
        {
            skip.remove(ProtoOpts::NO_EOH);
            if collect_noreply(Stage::Eoh) {
                noreply |= ProtoOpts::NOREPLY_EOH;
            }
        }
        if decls.iter().any(|d| d.rejected_recipients) {
            skip |= ProtoOpts::REJECTED_RCPT;
        }
        let mut wanted: BTreeMap<MacroStage, Vec<String>> = BTreeMap::new();
        for d in decls {
            for (stage, names) in &d.macros {
                wanted
                    .entry(macro_stage(*stage))
                    .or_default()
                    .extend(names.iter().cloned());
            }
        }
        let mut macros = HashMap::new();
        if !wanted.is_empty() {
            for (stage, core) in CORE_MACROS {
                wanted
                    .entry(*stage)
                    .or_default()
                    .extend(core.split(' ').map(String::from));
            }
            for (stage, mut names) in wanted {
                names.sort();
                names.dedup();
                if let Ok(list) = CString::new(names.join(" ")) {
                    macros.insert(stage, list);
                }
            }
        }
        Plan {
            skip,
            noreply,
            macros,
            keeps_body: decls.iter().any(|d| d.reads_body),
        }
    }
}

/// The macro set an MTA sends before `stage` (end of message for the stages without one).
pub(crate) fn macro_stage(stage: Stage) -> MacroStage {
    match stage {
        Stage::Connect => MacroStage::Connect,
        Stage::Helo => MacroStage::Helo,
        Stage::Mail => MacroStage::Mail,
        Stage::Rcpt => MacroStage::Rcpt,
        Stage::Data => MacroStage::Data,
        Stage::Eoh => MacroStage::Eoh,
        _ => MacroStage::Eom,
    }
}
