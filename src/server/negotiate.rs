//! The start of every MTA connection: pin the current generation, ask the MTA for what its
//! plan says, and open the connection's session.

use super::{Conn, Worker};
use crate::{
    engine::{Engine, SUPPORTED_ACTIONS},
    metrics::OpenConnection,
    session::{Negotiated, Session, SharedSession},
};
use indymilter::{Actions, NegotiateContext, ProtoOpts, Status};
use std::sync::Arc;

/// Negotiates for a connection of worker thread `worker`.
pub async fn negotiate(
    engine: Arc<Engine>,
    worker: Arc<Worker>,
    cx: &mut NegotiateContext<Conn>,
    offered_actions: Actions,
    offered_opts: ProtoOpts,
) -> Status {
    let generation = engine.current();
    let plan = &generation.plan;
    let wanted = plan.skip | plan.noreply;
    cx.requested_actions = offered_actions & SUPPORTED_ACTIONS;
    cx.requested_opts |= wanted & offered_opts;
    cx.requested_macros = plan.macros.clone();
    let negotiated = Negotiated {
        opts: cx.requested_opts,
        actions: cx.requested_actions,
    };
    let mut session = Session::new(negotiated, generation.site.hostname.clone());
    if plan.keeps_body {
        session.body_limit = Some(generation.services.dkim.max_body());
    }
    cx.data = Some(Conn {
        lease: generation.lease(worker.index),
        session: SharedSession::new(session),
        _open: OpenConnection::opened(),
        _on_worker: worker.opened(),
    });
    Status::Continue
}
