//! Seeds that once broke an invariant, kept as they were found (options included). A seed's run
//! changes as the code changes, so each also names the fix it guards; the swarm hunt finds new
//! ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fieldsync_simulations::{FaultSet, SimOptions, run};

fn passes(seed: u64, devices: usize, steps: u64) {
    passes_with(seed, devices, steps, false);
}

fn passes_with(seed: u64, devices: usize, steps: u64, upgrades: bool) {
    let trace = std::env::temp_dir().join(format!("fieldsync-sim-regression-{seed}.trace"));
    let report = run(
        SimOptions {
            seed,
            devices,
            steps,
            faults: FaultSet::all(),
            bug: None,
            shape: Default::default(),
            upgrades,
            relays: 1,
            wearables: false,
        },
        Some(&trace),
        false,
    )
    .unwrap();
    assert!(
        report.ok() && report.converged,
        "{}replay: fieldsync-sim --replay {}",
        report.render(),
        trace.display()
    );
    let _ = std::fs::remove_file(&trace);
}

/// An intake form locked on the relay while dev0's edit was in conflict: the record offered
/// keep-mine / keep-theirs / merged, every one refused, and dev0 stayed blocked forever with
/// 28 unsynced writes. Now a sealed record offers discard (and addendum for a signed note),
/// and the oracle checks that every offered option is accepted.
#[test]
fn seed_2114_a_conflict_on_a_record_locked_meanwhile_ends() {
    passes(2114, 8, 600);
}

/// A swarm shape (4 devices, 286 steps, a relay crash among the faults): the relay committed a
/// mutation and stopped before its `Applied` left it; the device's retry got `AlreadyApplied`,
/// which the oracle did not count as the acknowledgement, so "feed rows = acknowledged
/// mutations" failed (261 against 260) though nothing was applied twice. The oracle now counts
/// the first answer a device receives, whichever it is.
#[test]
fn swarm_seed_22280884056308508_an_answer_lost_in_a_relay_crash_is_acknowledged_by_the_replay() {
    let seed = 22280884056308508;
    let report = run(
        // As it was found: before the upgrade workload existed (a swarm may now draw it).
        SimOptions {
            upgrades: false,
            relays: 1,
            wearables: false,
            ..SimOptions::swarm(seed, fieldsync_simulations::SwarmBounds::CI)
        },
        None,
        false,
    )
    .unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
}

/// The first run of the schema-upgrade workload: a v1 device's write of `mrn` on a v3 relay,
/// which renamed it to `record_number`, got the relay's copy to `record_number` into the feed
/// entry — but the entry the writing device itself received was `Own` (its own change, not
/// decoded), because only last-writer-wins types were thought to get relay changes. The device
/// never saw the copy and disagreed with the relay for good. Renamed types now count too.
#[test]
fn upgrades_seed_1_the_writer_of_an_old_field_name_receives_the_relays_copy() {
    passes_with(1, 6, 300, true);
}

/// A swarm shape with the upgrade workload: the relay was down while the ladder moved twice,
/// so it came back on v3 without ever serving v2, and refused a device that had updated to v2
/// as "not a schema this relay has served" — for good (18 writes stuck). An operator now names
/// the versions apps shipped with (`serve --accept-schema FILE`, weighed like served ones), the
/// simulated operator names every earlier version, and the refusal tells the operator so.
#[test]
fn swarm_seed_93_a_device_on_a_version_the_relay_skipped_is_accepted_once_named() {
    let report = run(
        SimOptions::swarm(93, fieldsync_simulations::SwarmBounds::CI),
        None,
        false,
    )
    .unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
    assert_eq!(report.stats.relay_upgrades, 2);
}

/// Three relays under the upgrade workload: one relay crashed before its turn in the rolling
/// upgrade and came back on its old schema after another relay had adopted the newest, and
/// was refused at start (a downgrade), ending the run. A relay now comes back on the schema
/// the operator has deployed; the refusal itself is the relay's intended behaviour.
#[test]
fn cluster_upgrades_seed_7_a_relay_crashed_mid_rollout_comes_back_on_the_deployed_schema() {
    let report = run(
        SimOptions {
            seed: 7,
            devices: 8,
            steps: 600,
            faults: FaultSet::all(),
            bug: None,
            shape: Default::default(),
            upgrades: true,
            relays: 3,
            wearables: false,
        },
        None,
        false,
    )
    .unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
    assert_eq!(report.stats.relay_upgrades, 2);
}

/// A swarm shape with the upgrade and wearables workloads: a person on an app still on schema
/// v1 merged a duplicate workout that another device had given a `location` (a v2 field); the
/// merge copied only the fields v1 knows, so the survivor lost the location. A merge is now
/// refused while the other record holds a field the app's schema does not know.
#[test]
fn swarm_seed_39669558945314164_a_merge_on_an_older_schema_loses_no_newer_field() {
    let options = SimOptions::swarm(39669558945314164, fieldsync_simulations::SwarmBounds::CI);
    assert!(options.wearables && options.upgrades, "the shape it was found in");
    let report = run(options, None, false).unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
    assert!(report.stats.duplicates_merged > 0);
}

/// A hunt-scale swarm shape with the wearables workload: a flagged workout whose match was
/// merged away meanwhile stayed counted in `status` as a possible duplicate while the list
/// (rightly) showed nothing to decide, so the device never looked settled. The count is now
/// the list's: flags whose other record is still live.
#[test]
fn swarm_seed_1796523903038_a_flag_whose_match_was_merged_away_is_not_counted() {
    let report = run(
        SimOptions::swarm(1796523903038, fieldsync_simulations::SwarmBounds::HUNT),
        None,
        false,
    )
    .unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
}

/// A hunt-scale swarm shape with the wearables workload: a person's offline edit of a workout
/// met the tombstone of a merge made meanwhile on another device (delete versus edit), and
/// they resolved it on the tombstone; the no-value-lost check blamed the merge for the value
/// the person's resolution kept there. It now exempts a resolution on either record, as it
/// did one on the survivor.
#[test]
fn swarm_seed_1796528839074_an_edit_resolved_on_a_merged_away_record_is_the_persons_choice() {
    let report = run(
        SimOptions::swarm(1796528839074, fieldsync_simulations::SwarmBounds::HUNT),
        None,
        false,
    )
    .unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
}

/// Two devices of one person: the first's offline edit of a workout met a conflict, its
/// keep-theirs answer was refused (it carried the offline merge's `merged_into` on a
/// resolution) and the person discarded the refusal; the edit's change stayed in the device's
/// document, and its next write, on the current base, carried it to the relay, which applied
/// it: `notes` and `duration_min` ended with two concurrent values, left to Automerge's
/// tie-break. The relay now treats a write that leaves a gated field with differing concurrent
/// values as stale (a conflict, whatever base it claims), and a resolution may carry the
/// offline merge's `merged_into`.
#[test]
fn swarm_seed_30598176174131571_a_write_carrying_an_unseen_change_is_a_conflict() {
    let options = SimOptions::swarm(30598176174131571, fieldsync_simulations::SwarmBounds::CI);
    assert!(options.wearables, "the shape it was found in");
    let report = run(options, None, false).unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
}

/// Found by CI's commit-derived swarm sweep: two devices merged the same flagged workout offline
/// into two different survivors. One merge applied; the other came back as a conflict, and the
/// person kept their own merge — but the resolution left `merged_into` alone (a device never
/// puts it outside a merging delete), so the tombstone held both survivors as concurrent values
/// for Automerge's tie-break. A resolution that keeps a tombstone now writes its `merged_into`.
#[test]
fn swarm_seed_9972495080727367_a_resolution_between_two_merges_says_which_stands() {
    let options = SimOptions::swarm(9972495080727367, fieldsync_simulations::SwarmBounds::CI);
    assert!(options.wearables, "the shape it was found in");
    let report = run(options, None, false).unwrap();
    assert!(report.ok() && report.converged, "{}", report.render());
}
