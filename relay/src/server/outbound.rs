//! What the relay holds for connections to send, bounded per connection and for the whole
//! relay: the front thread counts every message it queues here before a connection task writes
//! it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use fieldsync_schema::RelayMessage;
use tokio::sync::mpsc;

use super::core_thread::{Outbound, Route};
use super::{OUTBOUND_BUDGET_BYTES, OUTBOUND_FAIR_SHARE_MIN, SEND_QUEUE_BYTES};
use crate::core::ConnId;

/// Why a message was not queued.
pub(crate) enum Unsent {
    Full,
    Closed,
}

/// What every connection's queue holds, all together, against [`OUTBOUND_BUDGET_BYTES`]. Each
/// connection's own bound ([`SEND_QUEUE_BYTES`]) is not enough: a thousand devices reading a
/// busy space slowly would each stay under it while the relay held gigabytes. Once the total is
/// over the budget, a live entry for a connection holding more than its fair share cuts that
/// connection as a slow reader. Answers to requests are not cut this way: each connection has
/// only a few requests in flight, so its own bound holds them.
pub(crate) struct OutboundBudget {
    queued: usize,
    fair_share: usize,
}

impl OutboundBudget {
    /// Reads the queues at the start of a delivery (the connection tasks drain them meanwhile,
    /// so this errs on the high side).
    pub(crate) fn measure(routes: &HashMap<ConnId, Route>) -> Self {
        let queued = routes.values().map(|r| r.queued_bytes.load(Ordering::Relaxed)).sum();
        let fair_share = (OUTBOUND_BUDGET_BYTES / routes.len().max(1)).max(OUTBOUND_FAIR_SHARE_MIN);
        OutboundBudget { queued, fair_share }
    }

    /// Queues one message for a connection, counting its estimated bytes against the
    /// connection's bound and the relay's: messages, not only their number, are bounded (one
    /// can be megabytes).
    pub(crate) fn enqueue(&mut self, route: &Route, msg: Outbound) -> Result<(), Unsent> {
        let (size, live) = match &msg {
            Outbound::Message { size, msg } => (*size, matches!(**msg, RelayMessage::Live { .. })),
            _ => (0, false),
        };
        let queued = route.queued_bytes.fetch_add(size, Ordering::Relaxed) + size;
        let over_relay_budget = live && self.queued + size > OUTBOUND_BUDGET_BYTES && queued > self.fair_share;
        let result = if queued > SEND_QUEUE_BYTES || over_relay_budget {
            Err(Unsent::Full)
        } else {
            route.tx.try_send(msg).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Unsent::Full,
                mpsc::error::TrySendError::Closed(_) => Unsent::Closed,
            })
        };
        match result {
            Ok(()) => self.queued += size,
            Err(_) => {
                route.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::watch;

    use super::*;

    fn route(queued: usize) -> (Route, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(16);
        let (kill, _) = watch::channel(false);
        let route = Route {
            tx,
            kill,
            queued_bytes: Arc::new(AtomicUsize::new(queued)),
            user: None,
        };
        (route, rx)
    }

    fn message(msg: RelayMessage) -> Outbound {
        let size = msg.size_hint();
        Outbound::Message {
            msg: Box::new(msg),
            size,
        }
    }

    fn live() -> Outbound {
        message(RelayMessage::Live { entries: Vec::new() })
    }

    #[test]
    fn over_the_relay_budget_live_entries_cut_the_connections_holding_more_than_their_share() {
        let (heavy, _heavy_rx) = route(OUTBOUND_FAIR_SHARE_MIN * 2);
        let (light, _light_rx) = route(0);
        let mut routes = HashMap::new();
        routes.insert(1, heavy);
        routes.insert(2, light);
        let mut budget = OutboundBudget::measure(&routes);
        assert_eq!(budget.fair_share, OUTBOUND_BUDGET_BYTES / 2);
        // Under the relay's budget, a connection holds up to its own bound.
        assert!(budget.enqueue(&routes[&1], live()).is_ok());
        // Over it: the heavy reader is cut, the light one still gets its entries, and
        // requested answers still go out to the heavy one.
        budget.queued = OUTBOUND_BUDGET_BYTES;
        budget.fair_share = OUTBOUND_FAIR_SHARE_MIN;
        let before = routes[&1].queued_bytes.load(Ordering::Relaxed);
        assert!(matches!(budget.enqueue(&routes[&1], live()), Err(Unsent::Full)));
        assert_eq!(
            routes[&1].queued_bytes.load(Ordering::Relaxed),
            before,
            "a refused message is not counted"
        );
        assert!(budget.enqueue(&routes[&2], live()).is_ok());
        assert!(
            budget
                .enqueue(&routes[&1], message(RelayMessage::Pong { nonce: 1 }))
                .is_ok()
        );
    }

    #[test]
    fn a_connection_is_cut_at_its_own_bound_whatever_the_relay_holds() {
        let (r, _rx) = route(SEND_QUEUE_BYTES);
        let routes = HashMap::from([(1, r)]);
        let mut budget = OutboundBudget::measure(&routes);
        assert!(matches!(
            budget.enqueue(&routes[&1], message(RelayMessage::Pong { nonce: 1 })),
            Err(Unsent::Full)
        ));
    }
}
