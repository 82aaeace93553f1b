import json, sys, time
import fieldsync

class Printer(fieldsync.SyncListener):
    def on_event(self, event):
        if event.is_entity_changed():
            print("changed by another device:", event.entity_type, event.entity_id)
        elif event.is_conflict_raised():
            print("a conflict to show the user:", event.entity_id)

device_dir, relay_url, token = sys.argv[1:4]
client = fieldsync.FieldsyncClient.open(device_dir)
if client.status().enrolled is None:
    client.enroll(relay_url, token)
client.add_listener(Printer())
client.start()
receipt = client.put("patient", None, json.dumps({"name": "Ada Lovelace"}))
while client.status().unsynced > 0:  # durable locally at once; here we wait for the relay
    time.sleep(0.1)
print("synced:", json.loads(client.get(receipt.entity_id).fields_json))
client.close()
