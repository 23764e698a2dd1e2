// Loaded with `node --import` before the MCP conformance suite: it adds agentgate's bearer
// token to every fetch the suite's client makes (the suite has no option for a token, and the
// gateway refuses a request without one). Only requests to AGENTGATE_MCP_URL's origin get it.
const token = process.env.AGENTGATE_MCP_TOKEN;
const origin = new URL(process.env.AGENTGATE_MCP_URL).origin;
const original = globalThis.fetch;
globalThis.fetch = (input, init = {}) => {
  const url = new URL(input instanceof Request ? input.url : String(input));
  if (!token || url.origin !== origin) return original(input, init);
  const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
  if (!headers.has("authorization")) headers.set("authorization", `Bearer ${token}`);
  return original(input, { ...init, headers });
};
