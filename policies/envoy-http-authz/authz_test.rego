# Tests for envoy.authz. The tokens are HS256 JWTs signed with the demo secret "sluice-demo-secret"
# (iss https://issuer.example.com, aud sluice-demo, exp 2100-01-01) except where noted; verified_test.rego uses
# them too.
package envoy.authz

# sub alice, roles [viewer]
viewer_token := "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6InNsdWljZS1kZW1vIiwiaWF0IjoxNzY3MjI1NjAwLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6ImFsaWNlIiwicm9sZXMiOlsidmlld2VyIl19.wwjWrAw-DDgBH2MQ9rDyuvC9gD-GidfBcsoQX7kTnX8"

# sub bob, roles [editor]
editor_token := "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6InNsdWljZS1kZW1vIiwiaWF0IjoxNzY3MjI1NjAwLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6ImJvYiIsInJvbGVzIjpbImVkaXRvciJdfQ.LsfdyZX8K4W_a_IAygFwCLATyY0i-o3yCYqRLNW1wlo"

# sub carol, roles [admin]
admin_token := "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6InNsdWljZS1kZW1vIiwiaWF0IjoxNzY3MjI1NjAwLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6ImNhcm9sIiwicm9sZXMiOlsiYWRtaW4iXX0.C1fFCoTpANlNUjc8QF4-OmufldC61aBpz7QQeK-ukU8"

# sub dave, roles [admin], expired on 2026-01-01T01:00:00Z
expired_token := "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6InNsdWljZS1kZW1vIiwiaWF0IjoxNzY3MjI1NjAwLCJleHAiOjE3NjcyMjkyMDAsInN1YiI6ImRhdmUiLCJyb2xlcyI6WyJhZG1pbiJdfQ.km8zJ8AqSyfxaKRI6c2rJ5bQ-g49u-IQmeN0rqpwnro"

# sub mallory, roles [admin], signed with another secret: the unverified policy accepts it, verified.rego does not
forged_token := "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6InNsdWljZS1kZW1vIiwiaWF0IjoxNzY3MjI1NjAwLCJleHAiOjQxMDI0NDQ4MDAsInN1YiI6Im1hbGxvcnkiLCJyb2xlcyI6WyJhZG1pbiJdfQ.VUIDyfSDfytwgefA-pRi47W5ucG_F4lPSs6SIDDGBk0"

# sub erin, roles [viewer], aud some-other-service
wrong_aud_token := "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlLmNvbSIsImF1ZCI6InNvbWUtb3RoZXItc2VydmljZSIsImlhdCI6MTc2NzIyNTYwMCwiZXhwIjo0MTAyNDQ0ODAwLCJzdWIiOiJlcmluIiwicm9sZXMiOlsidmlld2VyIl19.lPmup0Fg2EuMbxhYGmpok2pVPFWRRpo8eqKCBhZZKF4"

# An OPA-Envoy CheckRequest input.
request_with_token(method, url_path, token) := {"attributes": {
	"source": {"address": {"socketAddress": {"address": "10.1.2.3", "portValue": 51234}}},
	"request": {"http": {
		"method": method,
		"path": url_path,
		"host": "shop.example.com",
		"scheme": "http",
		"headers": {":authority": "shop.example.com", "authorization": concat(" ", ["Bearer", token])},
	}},
}}

request_without_token(method, url_path) := {"attributes": {"request": {"http": {
	"method": method,
	"path": url_path,
	"host": "shop.example.com",
	"headers": {":authority": "shop.example.com"},
}}}}

test_viewer_can_read_products if {
	allow with input as request_with_token("GET", "/api/products", viewer_token)
	allow with input as request_with_token("GET", "/api/products/42?fields=name", viewer_token)
}

test_viewer_cannot_write_products if {
	not allow with input as request_with_token("POST", "/api/products", viewer_token)
}

test_viewer_cannot_read_orders if {
	not allow with input as request_with_token("GET", "/api/orders/7", viewer_token)
}

test_star_matches_one_segment_only if {
	not allow with input as request_with_token("GET", "/api/products/42/reviews", viewer_token)
}

test_editor_can_write_products_but_not_delete if {
	allow with input as request_with_token("PUT", "/api/products/42", editor_token)
	not allow with input as request_with_token("DELETE", "/api/products/42", editor_token)
}

test_admin_can_do_anything_under_api_and_admin if {
	allow with input as request_with_token("DELETE", "/api/orders/7/items/3", admin_token)
	allow with input as request_with_token("POST", "/admin/cache/flush", admin_token)
	not allow with input as request_with_token("GET", "/internal/debug", admin_token)
}

test_health_checks_need_no_token if {
	allow with input as request_without_token("GET", "/healthz")
	not allow with input as request_without_token("POST", "/healthz")
}

test_missing_token_is_denied_with_401 if {
	not allow with input as request_without_token("GET", "/api/products")
	r := result with input as request_without_token("GET", "/api/products")
	r.allowed == false
	r.http_status == 401
	r.headers["www-authenticate"] == `Bearer realm="sluice"`
}

test_expired_token_is_denied_with_401 if {
	r := result with input as request_with_token("GET", "/api/products", expired_token)
	r.allowed == false
	r.http_status == 401
}

test_malformed_token_is_denied if {
	not allow with input as request_with_token("GET", "/api/products", "not-a-jwt")
	not allow with input as request_with_token("GET", "/api/products", "a.b")
}

test_wrong_role_is_denied_with_403 if {
	r := result with input as request_with_token("DELETE", "/api/products/42", viewer_token)
	r.allowed == false
	r.http_status == 403
	r.body == `{"error":"forbidden"}`
}

test_allowed_result_passes_the_user_upstream if {
	r := result with input as request_with_token("GET", "/api/products", editor_token)
	r.allowed == true
	r.http_status == 200
	r.headers == {"x-user-id": "bob", "x-user-roles": "editor"}
}

# The unverified decode accepts a token signed with any key: this is why production uses verified.rego.
test_unverified_decode_accepts_a_forged_token if {
	allow with input as request_with_token("DELETE", "/api/orders/7", forged_token)
}
