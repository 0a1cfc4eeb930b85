//! The milter stage vocabulary shared by config, engine, Lua API, logs, docs and the load generator.

use indymilter::ProtoOpts;
use std::{
    fmt,
    ops::{Index, IndexMut},
};

/// One milter callback stage, named as indymilter and the Lua API name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
    Header,
    Eoh,
    Body,
    Eom,
    Abort,
    Close,
    Unknown,
}

impl Stage {
    /// Every stage, in protocol order.
    pub const ALL: [Stage; 12] = [
        Stage::Connect,
        Stage::Helo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::Header,
        Stage::Eoh,
        Stage::Body,
        Stage::Eom,
        Stage::Abort,
        Stage::Close,
        Stage::Unknown,
    ];

    /// The stage's name as policies and logs spell it.
    pub const fn name(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::Header => "header",
            Stage::Eoh => "eoh",
            Stage::Body => "body",
            Stage::Eom => "eom",
            Stage::Abort => "abort",
            Stage::Close => "close",
            Stage::Unknown => "unknown",
        }
    }

    /// Parses a stage name.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }

    const fn index(self) -> usize {
        self as usize
    }

    /// The negotiation flags of this stage: the one that asks the MTA to skip it (`NO_*`) and
    /// the one that drops its reply (`NOREPLY_*`). Both empty for eom, abort and close, which
    /// are always sent.
    pub const fn protocol_flags(self) -> (ProtoOpts, ProtoOpts) {
        match self {
            Stage::Connect => (ProtoOpts::NO_CONNECT, ProtoOpts::NOREPLY_CONNECT),
            Stage::Helo => (ProtoOpts::NO_HELO, ProtoOpts::NOREPLY_HELO),
            Stage::Mail => (ProtoOpts::NO_MAIL, ProtoOpts::NOREPLY_MAIL),
            Stage::Rcpt => (ProtoOpts::NO_RCPT, ProtoOpts::NOREPLY_RCPT),
            Stage::Data => (ProtoOpts::NO_DATA, ProtoOpts::NOREPLY_DATA),
            Stage::Header => (ProtoOpts::NO_HEADER, ProtoOpts::NOREPLY_HEADER),
            Stage::Eoh => (ProtoOpts::NO_EOH, ProtoOpts::NOREPLY_EOH),
            Stage::Body => (ProtoOpts::NO_BODY, ProtoOpts::NOREPLY_BODY),
            Stage::Unknown => (ProtoOpts::NO_UNKNOWN, ProtoOpts::NOREPLY_UNKNOWN),
            Stage::Eom | Stage::Abort | Stage::Close => (ProtoOpts::empty(), ProtoOpts::empty()),
        }
    }

    /// Whether the MTA waits for a reply to this stage (abort and close have none).
    pub const fn has_reply(self) -> bool {
        !matches!(self, Stage::Abort | Stage::Close)
    }

    /// Whether the stage belongs to a message (MAIL FROM up to end of message).
    pub const fn in_message(self) -> bool {
        matches!(
            self,
            Stage::Mail
                | Stage::Rcpt
                | Stage::Data
                | Stage::Header
                | Stage::Eoh
                | Stage::Body
                | Stage::Eom
        )
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One value per stage, indexed by [`Stage`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageMap<T>([T; 12]);

impl<T> StageMap<T> {
    /// A map whose value for each stage is `f(stage)`.
    pub fn from_fn(mut f: impl FnMut(Stage) -> T) -> StageMap<T> {
        StageMap(std::array::from_fn(|i| f(Stage::ALL[i])))
    }
}

impl<T> Index<Stage> for StageMap<T> {
    type Output = T;

    fn index(&self, stage: Stage) -> &T {
        &self.0[stage.index()]
    }
}

impl<T> IndexMut<Stage> for StageMap<T> {
    fn index_mut(&mut self, stage: Stage) -> &mut T {
        &mut self.0[stage.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_index_matches_position() {
        for (i, s) in Stage::ALL.into_iter().enumerate() {
            assert_eq!(Stage::from_name(s.name()), Some(s));
            assert_eq!(s.index(), i);
        }
        assert_eq!(Stage::from_name("conect"), None);
    }

    #[test]
    fn stage_map_keeps_one_value_per_stage() {
        let mut map = StageMap::from_fn(|s| s.in_message());
        map[Stage::Eom] = false;
        let chosen: Vec<Stage> = Stage::ALL.into_iter().filter(|s| map[*s]).collect();
        assert_eq!(
            chosen,
            [
                Stage::Mail,
                Stage::Rcpt,
                Stage::Data,
                Stage::Header,
                Stage::Eoh,
                Stage::Body
            ]
        );
    }
}
