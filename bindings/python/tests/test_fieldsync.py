"""The Python bindings against a real relay process.

Run by `cargo test` (bindings/tests/python.rs), which builds the library, generates the
`fieldsync` module next to it and points FIELDSYNC_RELAY at the relay binary. By hand:
`FIELDSYNC_RELAY=target/debug/fieldsync-relay PYTHONPATH=<generated dir> python3 -m unittest
discover -s bindings/python/tests`.
"""

import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import unittest

import fieldsync
from fieldsync import FieldFilter, FieldsyncClient, FieldsyncError, Resolution, SyncListener

RELAY = os.environ.get("FIELDSYNC_RELAY", "fieldsync-relay")


class Relay:
    """A `fieldsync-relay serve` process on 127.0.0.1 and its admin commands."""

    def __init__(self, data, port=0):
        self.data = data
        self.proc = subprocess.Popen(
            [RELAY, "serve", "--data", data, "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RUST_LOG": "warn"},
        )
        deadline = time.monotonic() + 30
        self.url = None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError(f"the relay exited before listening: {self.proc.wait()}")
            found = re.search(r"listening on (ws://[0-9.]+:\d+)", line)
            if found:
                self.url = found.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("the relay did not start")
        self.port = int(self.url.rsplit(":", 1)[1])
        # Keep reading stderr so the relay never blocks on a full pipe.
        self.drain = threading.Thread(target=self.proc.stderr.read, daemon=True)
        self.drain.start()

    def admin(self, *args):
        out = subprocess.run(
            [RELAY, "admin", "--data", self.data, *args], capture_output=True, text=True, check=True
        )
        return out.stdout

    def token(self, user):
        return self.admin("enroll", user).splitlines()[0].strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.drain.join(timeout=30)
        self.proc.stderr.close()


class Recorder(SyncListener):
    """A listener that keeps every event with the time it arrived."""

    def __init__(self):
        self.events = queue.Queue()
        self.seen = []

    def on_event(self, event):
        self.events.put((time.monotonic(), event))

    def wait_for(self, matches, timeout=15):
        """The first event (from now on) for which `matches` is true, and when it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout}s; saw {self.seen[-10:]}")
            try:
                at, event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(event)
            if matches(event):
                return at, event


class ReadsBack(SyncListener):
    """A listener that reads the changed record from inside its callback: the database is not
    locked while callbacks run, and the change is already committed."""

    def __init__(self, client):
        self.client = client
        self.names = queue.Queue()

    def on_event(self, event):
        if event.is_entity_changed():
            self.names.put(json.loads(self.client.get(event.entity_id).fields_json)["name"])


class Throws(SyncListener):
    """An app bug: every callback raises. Its own later events must still come."""

    def __init__(self):
        self.calls = 0

    def on_event(self, event):
        self.calls += 1
        raise RuntimeError("a bug in the app's listener")


def changed(entity_id):
    return lambda e: e.is_entity_changed() and e.entity_id == entity_id


def wait_until(check, timeout=15, what="condition"):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def synced(client):
    return lambda: client.status().unsynced == 0


class TwoDevicesOnOneRelay(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="fieldsync-py-")
        self.relay = Relay(os.path.join(self.tmp, "relay"))
        self.relay.admin("space", "add", "clinic")
        self.relay.admin("user", "add", "dana", "--space", "clinic", "--role", "clinician")
        self.clients = []

    def tearDown(self):
        for client in self.clients:
            client.close()
        self.relay.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def device(self, name, enroll=True):
        client = FieldsyncClient.open(os.path.join(self.tmp, name))
        self.clients.append(client)
        recorder = Recorder()
        client.add_listener(recorder)
        if enroll:
            status = client.enroll(self.relay.url, self.relay.token("dana"))
            self.assertEqual(status.enrolled.user_name, "dana")
            client.start()
        return client, recorder

    def test_a_write_reaches_the_other_device_live_and_its_listener_within_a_second(self):
        tablet, tablet_events = self.device("tablet")
        phone, phone_events = self.device("phone")
        phone_events.wait_for(lambda e: e.is_connected())
        reads_back, throws = ReadsBack(phone), Throws()
        phone.add_listener(throws)
        phone.add_listener(reads_back)

        receipt = tablet.put("patient", None, json.dumps({"name": "Ada Lovelace", "date_of_birth": "1815-12-10"}))
        self.assertEqual(receipt.kind, "create")
        tablet_events.wait_for(lambda e: e.is_status_changed() and e.status.unsynced == 0)
        applied_at = time.monotonic()
        arrived_at, _ = phone_events.wait_for(changed(receipt.entity_id))
        self.assertLess(arrived_at - applied_at, 1.0, "the phone heard of the write more than a second after it was applied")

        # The event comes after the local commit: the record is there to read.
        record = phone.get(receipt.entity_id)
        self.assertEqual(json.loads(record.fields_json)["name"], "Ada Lovelace")
        self.assertEqual(record.sync_state, fieldsync.RecordSyncState.SYNCED)
        found = phone.list("patient", [FieldFilter(field="name", value_json='"Ada Lovelace"')], False)
        self.assertEqual([e.entity_id for e in found], [receipt.entity_id])
        self.assertEqual(phone.list("patient", [FieldFilter(field="name", value_json='"Grace"')], False), [])
        self.assertEqual(reads_back.names.get(timeout=10), "Ada Lovelace")
        wait_until(lambda: throws.calls >= 2, what="a throwing listener called again")

    def test_field_errors_come_as_typed_exceptions_with_every_rule_broken(self):
        tablet, _ = self.device("tablet", enroll=False)
        with self.assertRaises(FieldsyncError.Invalid) as raised:
            tablet.put("session", None, json.dumps({"pain_before": 11}))
        errors = {(f.field, f.rule) for f in raised.exception.field_errors}
        self.assertEqual(errors, {("patient_id", "required"), ("started_at", "required"), ("pain_before", "max")})
        self.assertIn("pain_before", str(raised.exception))
        self.assertEqual(tablet.list("session", [], True), [], "nothing of a refused write is kept")

        with self.assertRaises(FieldsyncError.BadArgument):
            tablet.put("patient", None, "[1, 2]")
        with self.assertRaises(FieldsyncError.NotFound):
            tablet.put("patinet", None, json.dumps({"name": "x"}))
        with self.assertRaises(FieldsyncError.NotAllowed):
            tablet.start()  # not enrolled

    def test_a_conflict_is_announced_shown_three_ways_and_resolved_with_a_merge(self):
        tablet, tablet_events = self.device("tablet")
        phone, phone_events = self.device("phone")
        patient = tablet.put("patient", None, json.dumps({"name": "Ada", "phone": "111"})).entity_id
        phone_events.wait_for(changed(patient))

        phone.stop()
        tablet.put("patient", patient, json.dumps({"phone": "222"}))
        wait_until(synced(tablet), what="the tablet's edit applied")
        phone.put("patient", patient, json.dumps({"phone": "333"}))
        phone.start()

        _, event = phone_events.wait_for(lambda e: e.is_conflict_raised())
        self.assertEqual(event.entity_id, patient)
        [conflict] = phone.conflicts()
        self.assertEqual(set(conflict.options), {"keep_mine", "keep_theirs", "merged"})
        phone_field = next(f for f in conflict.fields if f.field == "phone")
        self.assertEqual(phone_field.status, "contested")
        self.assertEqual(
            (json.loads(phone_field.base_json), json.loads(phone_field.mine.value_json), json.loads(phone_field.theirs.value_json)),
            ("111", "333", "222"),
        )
        self.assertEqual(phone.status().state, fieldsync.SyncState.BLOCKED)

        phone.resolve(patient, Resolution.MERGED(fields_json=json.dumps({"phone": "222 / 333"})))
        wait_until(synced(phone), what="the resolution applied")
        tablet_events.wait_for(changed(patient))
        self.assertEqual(json.loads(tablet.get(patient).fields_json)["phone"], "222 / 333")
        self.assertEqual(phone.conflicts(), [])

    def test_writes_survive_a_device_restart_and_a_relay_restart(self):
        tablet, _ = self.device("tablet")
        phone, phone_events = self.device("phone")
        first = tablet.put("patient", None, json.dumps({"name": "Before"})).entity_id
        phone_events.wait_for(changed(first))

        # The relay goes away; the tablet keeps writing offline, then its app restarts.
        self.relay.stop()
        queued = tablet.put("patient", None, json.dumps({"name": "Written offline"})).entity_id
        self.assertGreaterEqual(tablet.status().unsynced, 1)
        # A second address of the cluster to fail over to (nothing listens there: it is skipped).
        tablet.set_relays([self.relay.url, "ws://127.0.0.1:9"])
        with self.assertRaises(FieldsyncError.BadArgument):
            tablet.set_relays(["http://not-a-relay"])
        tablet.close()
        with self.assertRaises(FieldsyncError.NotAllowed):
            tablet.status()
        tablet = FieldsyncClient.open(os.path.join(self.tmp, "tablet"))
        self.clients.append(tablet)
        self.assertEqual(json.loads(tablet.get(queued).fields_json)["name"], "Written offline")
        self.assertEqual(tablet.status().enrolled.user_name, "dana")
        self.assertEqual(tablet.relays()[1:], ["ws://127.0.0.1:9"], "the list survives the restart")
        tablet.start()

        self.relay = Relay(self.relay.data, self.relay.port)
        phone_events.wait_for(changed(queued), timeout=30)
        self.assertEqual(json.loads(phone.get(queued).fields_json)["name"], "Written offline")
        wait_until(synced(tablet), timeout=30, what="the tablet drained")

    def test_export_sign_out_and_import_keep_the_same_device(self):
        tablet, _ = self.device("tablet", enroll=False)
        note_patient = tablet.put("patient", None, json.dumps({"name": "Kept"})).entity_id
        device_id = tablet.device_id()
        with self.assertRaises(FieldsyncError.NotAllowed):
            tablet.sign_out(False)  # unsynced and not exported
        tablet.status()  # still usable after the refusal

        backup = os.path.join(self.tmp, "tablet.backup")
        report = tablet.export_backup(backup)
        self.assertEqual(report.entities, 1)
        signed_out = tablet.sign_out(False)
        self.assertEqual(signed_out.device_id, device_id)

        restored = FieldsyncClient.import_backup(os.path.join(self.tmp, "restored"), backup)
        self.clients.append(restored)
        self.assertEqual(restored.device_id(), device_id)
        self.assertEqual(json.loads(restored.get(note_patient).fields_json)["name"], "Kept")
        self.assertEqual([i.state for i in restored.queue(False)], ["pending"])

    def test_an_encrypted_device_opens_only_with_its_key(self):
        key, other = "3f" * 32, "a1" * 32
        path = os.path.join(self.tmp, "encrypted")
        tablet = FieldsyncClient.open_encrypted(path, key)
        patient = tablet.put("patient", None, json.dumps({"name": "Quentin Marchetti"})).entity_id
        self.assertTrue(tablet.status().encrypted)
        backup = os.path.join(self.tmp, "encrypted.backup")
        tablet.export_backup(backup)
        tablet.close()
        for name in os.listdir(path):
            with open(os.path.join(path, name), "rb") as f:
                self.assertNotIn(b"Marchetti", f.read(), name)
        with self.assertRaises(FieldsyncError.Key):
            FieldsyncClient.open_encrypted(path, other)
        with self.assertRaises(FieldsyncError.Key):
            FieldsyncClient.open(path)
        with self.assertRaises(FieldsyncError.Key):
            FieldsyncClient.open_encrypted(path, "not hex")

        reopened = FieldsyncClient.open_encrypted(path, key)
        self.assertIsNone(reopened.synced_types())
        reopened.set_synced_types(["patient", "session"])
        self.assertEqual(reopened.synced_types(), ["patient", "session"])
        with self.assertRaises(FieldsyncError.NotFound):
            reopened.set_synced_types(["patinet"])
        reopened.set_synced_types(None)
        reopened.rekey(other)
        self.assertEqual(json.loads(reopened.get(patient).fields_json)["name"], "Quentin Marchetti")
        reopened.close()
        self.clients.append(FieldsyncClient.open_encrypted(path, other))
        with self.assertRaises(FieldsyncError.Key):
            FieldsyncClient.import_backup(os.path.join(self.tmp, "restored"), backup)
        restored = FieldsyncClient.import_backup(os.path.join(self.tmp, "restored"), backup, key)
        self.clients.append(restored)
        self.assertEqual(json.loads(restored.get(patient).fields_json)["name"], "Quentin Marchetti")

    def test_a_device_syncs_by_windows_and_queues_fetches_offline(self):
        watch = FieldsyncClient.open(os.path.join(self.tmp, "watch"))
        self.clients.append(watch)
        self.assertFalse(watch.windowed())
        with self.assertRaises(FieldsyncError.NotAllowed):
            watch.evict()
        watch.set_windowed(True)
        self.assertTrue(watch.status().windowed)
        entry = watch.put("journal_entry", None, json.dumps({"date": "2026-12-01", "body": "ok"})).entity_id
        self.assertTrue(watch.fetch("journal_entry", entry), "held already")
        elsewhere = "0b0e5e1c-0000-4000-8000-000000000001"
        self.assertFalse(watch.fetch("journal_entry", elsewhere))
        self.assertEqual(watch.status().fetch_queued, 1)
        with self.assertRaises(FieldsyncError.NotFound):
            watch.fetch("jornal_entry", elsewhere)
        self.assertEqual(watch.evict(), 0, "nothing synced left its window")
        watch.set_metered(True)
        self.assertEqual(watch.status().deferred_types, ["exercise", "vocab"])
        watch.set_metered(False)
        self.assertEqual(watch.status().deferred_types, [])


if __name__ == "__main__":
    unittest.main()
