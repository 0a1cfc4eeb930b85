//! Runs policies: Lua states, the policy chain, verdict merging, limits and generations.
//!
//! # The bridge between indymilter and Lua
//!
//! indymilter drives each MTA connection as a `Send` future on the tokio runtime. mlua is built
//! with its `send` feature, so a `Lua` state can be used from any worker thread; each state sits
//! behind its own mutex that is held only while Lua code runs and released whenever a handler
//! awaits (DNS, store, `milter.sleep`). A handler call therefore runs on the worker thread that
//! polls its connection, with no thread hop and no channel: the call costs one coroutine
//! creation plus the Lua code itself.
//!
//! A [`Generation`] owns several identical states (one per worker thread by default). A new
//! connection is pinned to its worker thread's state for its whole life, so per-connection Lua
//! data stays in one state and Lua work spreads over all cores. Two connections on one state
//! interleave at await points (the OpenResty model): while one waits on DNS, the other runs.
//!
//! Every handler call runs in a fresh coroutine with an instruction-count hook that enforces the
//! wall-clock time limit even in loops that never yield (the sandbox's `pcall` cannot catch it),
//! under a tokio timeout for time spent awaiting. Faults (errors, bad return values, limits) are
//! logged with policy, stage and `file:line`, and answered by the exception policy.
//!
//! Files: [`generation`] (a loaded chain, the engine's current generation), [`chain`] (one stage
//! through the chain), [`plan`] (negotiation from the policies), [`policy`] (one policy file),
//! [`options`] (its options and overrides), [`sandbox`] (the Lua state policies run in).

pub mod chain;
pub mod generation;
pub mod options;
pub mod plan;
pub mod policy;
pub mod sandbox;
pub mod shadow;

pub use chain::{Outcome, StageArgs};
pub use generation::{Engine, Generation, VmLease};
pub use plan::{Plan, SUPPORTED_ACTIONS};
