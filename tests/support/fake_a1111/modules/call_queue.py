"""``modules.call_queue``: the lock every WebUI job holds while it uses the model."""
import threading

queue_lock = threading.Lock()
