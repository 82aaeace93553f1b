//! Simulated users dealing with what their device shows them: conflicts to resolve (keep mine,
//! keep theirs, or a merge), rejected edits to turn into addenda or discard, LWW losses.

use crate::world::World;

impl World {
    pub fn on_user_resolves(&mut self, i: usize) {
        self.devices[i].resolve_scheduled = false;
        let now = self.now();
        let Some(dev) = self.devices[i].dev.as_ref() else {
            return;
        };
        let blocked = dev.status().ok().and_then(|s| s.blocked);
        if let Some(b) = blocked {
            self.trace.record(
                now,
                &format!(
                    "dev{i} user sees blocked {} {}: {}",
                    b.entity_type, b.entity_id, b.reason
                ),
            );
        }
    }
}
