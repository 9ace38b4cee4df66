package envoy.spiffe

call(caller_id, method, url_path) := {"attributes": {
	"source": {
		"address": {"socketAddress": {"address": "10.1.4.7", "portValue": 40112}},
		"principal": caller_id,
	},
	"destination": {
		"address": {"socketAddress": {"address": "10.1.5.9", "portValue": 8080}},
		"principal": "spiffe://cluster.local/ns/shop/sa/catalog",
	},
	"request": {"http": {
		"method": method,
		"path": url_path,
		"host": "catalog.shop.svc.cluster.local:8080",
		"headers": {":authority": "catalog.shop.svc.cluster.local:8080"},
	}},
}}

plaintext_call(method, url_path) := {"attributes": {"request": {"http": {
	"method": method,
	"path": url_path,
	"headers": {},
}}}}

frontend := "spiffe://cluster.local/ns/shop/sa/frontend"

checkout := "spiffe://cluster.local/ns/shop/sa/checkout"

test_frontend_can_read_products if {
	allow with input as call(frontend, "GET", "/api/products")
	allow with input as call(frontend, "GET", "/api/products/42?view=full")
}

test_frontend_cannot_create_orders if {
	not allow with input as call(frontend, "POST", "/api/orders")
}

test_frontend_can_change_the_cart if {
	allow with input as call(frontend, "POST", "/api/cart/items")
	not allow with input as call(frontend, "PUT", "/api/cart/items")
}

test_checkout_can_create_orders_only if {
	allow with input as call(checkout, "POST", "/api/orders")
	not allow with input as call(checkout, "GET", "/api/products")
}

test_any_monitoring_service_account_can_scrape if {
	allow with input as call("spiffe://cluster.local/ns/monitoring/sa/prometheus", "GET", "/metrics")
	allow with input as call("spiffe://cluster.local/ns/monitoring/sa/otel-collector", "GET", "/metrics")
	not allow with input as call("spiffe://cluster.local/ns/monitoring/sa/prometheus", "GET", "/api/products")
}

test_star_does_not_cross_segments if {
	not allow with input as call("spiffe://cluster.local/ns/monitoring/sa/x/extra", "GET", "/metrics")
	not allow with input as call(frontend, "GET", "/api/products/42/reviews")
}

test_same_service_account_in_another_namespace_is_denied if {
	not allow with input as call("spiffe://cluster.local/ns/dev/sa/frontend", "GET", "/api/products")
}

test_other_trust_domain_is_denied if {
	not allow with input as call("spiffe://evil.example.com/ns/shop/sa/frontend", "GET", "/api/products")
	r := reason with input as call("spiffe://evil.example.com/ns/shop/sa/frontend", "GET", "/api/products")
	r == "no SPIFFE identity of the trust domain: mTLS required"
}

test_plaintext_call_is_denied if {
	r := result with input as plaintext_call("GET", "/api/products")
	r.allowed == false
	r.http_status == 403
	r.headers == {"x-sluice-caller": ""}
}

test_denied_result_explains_why if {
	r := result with input as call(checkout, "DELETE", "/api/orders")
	r.allowed == false
	r.body == `{"error":"forbidden","reason":"spiffe://cluster.local/ns/shop/sa/checkout may not DELETE /api/orders"}`
}

test_allowed_result_names_the_caller if {
	r := result with input as call(frontend, "GET", "/api/products")
	r == {"allowed": true, "http_status": 200, "headers": {"x-sluice-caller": frontend}, "body": ""}
}
