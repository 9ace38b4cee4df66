# The same roles table as envoy.authz, but the token must be signed with the HS256 secret in
# data.secrets.jwt_hs256, issued by `issuer` for `audience`, and unexpired. Query: data.envoy.authz_verified.allow
#
# The secret comes from the AuthorizationPolicy's `data` (spec.data: {secrets: {jwt_hs256: ...}}). Without it
# every token is rejected (fail closed). For tokens from an identity provider prefer RS256/ES256: replace
# "secret" below with "cert" and the provider's public key (PEM or JWKS), which is not a secret.
package envoy.authz_verified

import data.envoy.authz

issuer := "https://issuer.example.com"

audience := "sluice-demo"

default allow := false

allow if authz.public_request

allow if {
	some role in verified_claims.roles
	authz.role_allows(role)
}

# decode_verify checks the signature, exp/nbf against the current time, iss and aud; it returns
# [false, {}, {}] for any token that fails a check.
verified_claims := payload if {
	constraints := {"secret": data.secrets.jwt_hs256, "iss": issuer, "aud": audience}
	decoded := io.jwt.decode_verify(authz.bearer_token, constraints)
	decoded[0] == true
	payload := decoded[2]
}
