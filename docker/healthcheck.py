"""Container health check: exit 0 when the backend's /health says UP (basic auth from the env)."""

import base64
import json
import os
import sys
import urllib.request

request = urllib.request.Request(f"http://127.0.0.1:{os.environ.get('PORT', '9090')}/health")
user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
if user:
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        status = json.load(response).get("status")
except Exception as exc:  # not answering yet
    print(f"health: {type(exc).__name__}: {exc}")
    sys.exit(1)
print(f"health: {status}")
sys.exit(0 if status == "UP" else 1)
