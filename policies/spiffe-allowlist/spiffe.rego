# Service-to-service allow-list by SPIFFE identity.
#
# With mesh mTLS, Envoy puts the caller's certificate identity in input.attributes.source.principal, e.g.
# spiffe://cluster.local/ns/shop/sa/frontend (Istio: trust domain / namespace / service account). Each entry
# of `allowlist` lets callers matching a principal glob use some methods on some path globs of the workload
# this policy is pushed to. Anything else is denied, including plain-text calls that carry no principal.
#
# Decisions: data.envoy.spiffe.allow (boolean) and data.envoy.spiffe.result (object, for Envoy).
package envoy.spiffe

default allow := false

# Only identities of this trust domain are considered at all.
trust_domain := "cluster.local"

# Globs use "/" as the delimiter: `*` matches within one segment, `**` across segments.
allowlist := [
	{
		"principals": ["spiffe://cluster.local/ns/shop/sa/frontend"],
		"methods": ["GET", "HEAD"],
		"paths": ["/api/products", "/api/products/*"],
	},
	{
		"principals": ["spiffe://cluster.local/ns/shop/sa/frontend"],
		"methods": ["POST", "DELETE"],
		"paths": ["/api/cart/*"],
	},
	{
		"principals": ["spiffe://cluster.local/ns/shop/sa/checkout"],
		"methods": ["POST"],
		"paths": ["/api/orders"],
	},
	{
		# Any service account of the monitoring namespace may scrape metrics.
		"principals": ["spiffe://cluster.local/ns/monitoring/sa/*"],
		"methods": ["GET"],
		"paths": ["/metrics"],
	},
]

request := input.attributes.request.http

# The path without its query string.
path := split(request.path, "?")[0]

# The caller's SPIFFE ID, when it is one of our trust domain.
principal := p if {
	p := input.attributes.source.principal
	startswith(p, concat("", ["spiffe://", trust_domain, "/"]))
}

allow if {
	some entry in allowlist
	some pattern in entry.principals
	glob.match(pattern, ["/"], principal)
	request.method in entry.methods
	some path_pattern in entry.paths
	glob.match(path_pattern, ["/"], path)
}

# Why a request is denied, for the response body and the decision log.
default reason := "allowed"

reason := "no SPIFFE identity of the trust domain: mTLS required" if not principal

reason := sprintf("%s may not %s %s", [principal, request.method, path]) if {
	principal
	not allow
}

# Object decision, for an ext_authz server configured with `query: data.envoy.spiffe.result`.
result := {
	"allowed": allow,
	"http_status": http_status,
	"headers": {"x-sluice-caller": caller},
	"body": body,
}

default http_status := 403

http_status := 200 if allow

default caller := ""

caller := principal

default body := ""

body := json.marshal({"error": "forbidden", "reason": reason}) if not allow
