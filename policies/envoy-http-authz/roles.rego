# The roles table of envoy.authz: edit it to fit your API.
#
# It is Rego rather than a data.json so that the policy behaves the same whether this directory is loaded alone
# (a bundle built from it) or together with the other example policies (`sluice policy test policies/`), where
# a data.json would land under a different path. See ../README.md.
package envoy.authz

# Paths anyone may GET or HEAD, token or not.
public_paths := ["/healthz", "/readyz", "/public/**"]

# Role -> list of {methods, paths}: a request is allowed when one entry lists its method (or "*") and one of
# the entry's path globs matches its path. Globs use "/" as the delimiter: `*` matches within one path segment,
# `**` across segments.
role_permissions := {
	"viewer": [{
		"methods": ["GET", "HEAD"],
		"paths": ["/api/products", "/api/products/*"],
	}],
	"editor": [
		{
			"methods": ["GET", "HEAD"],
			"paths": ["/api/products", "/api/products/*", "/api/orders", "/api/orders/*"],
		},
		{
			"methods": ["POST", "PUT", "PATCH"],
			"paths": ["/api/products", "/api/products/*"],
		},
	],
	"admin": [{
		"methods": ["*"],
		"paths": ["/api/**", "/admin/**"],
	}],
}
