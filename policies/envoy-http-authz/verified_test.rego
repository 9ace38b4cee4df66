# Tests for envoy.authz_verified, with the demo secret mocked into data.secrets.jwt_hs256.
#
# Each test binds its input to a local variable before `with input as`: regorus 0.14 evaluates a `with` value
# that refers to another package's rules (here data.envoy.authz.request_with_token and the tokens) as
# undefined, which would make every `not allow` test pass for the wrong reason.
package envoy.authz_verified

import data.envoy.authz

secret := "sluice-demo-secret"

test_verified_viewer_can_read_products if {
	req := authz.request_with_token("GET", "/api/products/42", authz.viewer_token)
	allow with input as req with data.secrets.jwt_hs256 as secret
}

test_verified_claims_are_the_token_payload if {
	req := authz.request_with_token("GET", "/api/products/42", authz.editor_token)
	claims := verified_claims with input as req with data.secrets.jwt_hs256 as secret
	claims.sub == "bob"
	claims.roles == ["editor"]
}

test_verified_role_still_limits_methods if {
	req := authz.request_with_token("DELETE", "/api/products/42", authz.viewer_token)
	not allow with input as req with data.secrets.jwt_hs256 as secret
}

test_forged_token_is_denied if {
	req := authz.request_with_token("DELETE", "/api/orders/7", authz.forged_token)
	not allow with input as req with data.secrets.jwt_hs256 as secret

	# The same request with a genuine admin token is allowed.
	genuine := authz.request_with_token("DELETE", "/api/orders/7", authz.admin_token)
	allow with input as genuine with data.secrets.jwt_hs256 as secret
}

test_expired_token_is_denied if {
	req := authz.request_with_token("GET", "/api/products", authz.expired_token)
	not allow with input as req with data.secrets.jwt_hs256 as secret
}

test_wrong_audience_is_denied if {
	req := authz.request_with_token("GET", "/api/products", authz.wrong_aud_token)
	not allow with input as req with data.secrets.jwt_hs256 as secret
}

test_no_secret_configured_denies_every_token if {
	req := authz.request_with_token("GET", "/api/products", authz.admin_token)
	not allow with input as req
}

test_wrong_secret_denies_every_token if {
	req := authz.request_with_token("GET", "/api/products", authz.admin_token)
	not allow with input as req with data.secrets.jwt_hs256 as "another-secret"
}

test_public_paths_need_no_token if {
	req := authz.request_without_token("GET", "/readyz")
	allow with input as req
}
