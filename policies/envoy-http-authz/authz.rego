# OPA-Envoy style HTTP authorization.
#
# The caller's roles come from the JWT in the `Authorization: Bearer <token>` header; each role may use some
# methods on some path globs (the table is in roles.rego). Decisions:
#   data.envoy.authz.allow   boolean, false unless a rule below allows
#   data.envoy.authz.result  object decision for Envoy: allowed, http_status, headers, body
#
# The token is only DECODED here, not verified, as in the OPA-Envoy tutorial: anyone can forge a token that
# this policy accepts. Use it only behind something that already verified the token (an Istio
# RequestAuthentication, an Envoy jwt_authn filter). verified.rego (data.envoy.authz_verified.allow) checks the
# signature, issuer, audience and expiry itself with io.jwt.decode_verify.
package envoy.authz

default allow := false

request := input.attributes.request.http

# The path without its query string.
path := split(request.path, "?")[0]

# Health checks and public assets need no token.
allow if public_request

# A role of the (unexpired) token allows the method on the path.
allow if {
	some role in claims.roles
	role_allows(role)
}

public_request if {
	request.method in {"GET", "HEAD"}
	some pattern in public_paths
	glob.match(pattern, ["/"], path)
}

# role_allows(role) holds when an entry of role_permissions[role] allows this request's method and path.
# verified.rego calls it with the roles of a verified token.
role_allows(role) if {
	some permission in role_permissions[role]
	method_allowed(permission.methods)
	some pattern in permission.paths
	glob.match(pattern, ["/"], path)
}

method_allowed(methods) if request.method in methods

method_allowed(methods) if "*" in methods

# The token of an `Authorization: Bearer <token>` header (Envoy passes header names in lower case).
bearer_token := token if {
	parts := split(request.headers.authorization, " ")
	count(parts) == 2
	lower(parts[0]) == "bearer"
	token := parts[1]

	# Three base64url segments: anything else is not decoded at all.
	regex.match(`^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$`, token)
}

# The token's claims, when it decodes and has not expired. NOT a proof of who the caller is: see the top.
claims := payload if {
	payload := io.jwt.decode(bearer_token)[1]
	not expired(payload)
}

expired(payload) if payload.exp <= time.now_ns() / 1000000000

# Object decision, for an ext_authz server configured with `query: data.envoy.authz.result`. When allowed,
# `headers` are added to the request sent upstream; when denied, Envoy answers with http_status, headers and
# body.
result := {
	"allowed": allow,
	"http_status": http_status,
	"headers": response_headers,
	"body": response_body,
}

default http_status := 403

http_status := 200 if allow

# No usable token: 401 asks the client to authenticate; a valid token without the right role gets 403.
http_status := 401 if {
	not allow
	not claims
}

default response_headers := {}

response_headers := {"x-user-id": claims.sub, "x-user-roles": concat(",", sort(claims.roles))} if allow

response_headers := {"www-authenticate": `Bearer realm="sluice"`} if http_status == 401

default response_body := ""

response_body := json.marshal({"error": "unauthenticated"}) if http_status == 401

response_body := json.marshal({"error": "forbidden"}) if http_status == 403
