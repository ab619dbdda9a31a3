//! The black-box suite: each scenario drives a deployment through its HTTP
//! API only. A scenario works on products, customers and keys of its own and
//! measures global figures (stats, lists) as differences, so several may run
//! one after another on one deployment.

use serde_json::{json, Value};

use super::{cents, tag, Client, StatusCode};

/// Every scenario, one after another; the happy path's order id.
pub async fn all(c: &Client) -> String {
    bad_input(c).await;
    hostile_input(c).await;
    let id = happy_path(c).await;
    out_of_stock(c).await;
    declined_payment(c).await;
    cancellation(c).await;
    payment_timeout(c).await;
    idempotency_keys(c).await;
    promotion_codes(c).await;
    queries(c).await;
    health_metrics_and_openapi(c).await;
    id
}

/// An order completes, reads back at once, holds its stock and gets one
/// email; its history is the order stream's. Returns its id.
pub async fn happy_path(c: &Client) -> String {
    let widget = c.product("Widget", "12.50", 10).await;
    let gadget = c.product("Gadget", "0.99", 5).await;
    let (status, placed) = c
        .order("Ada@Example.com", &[(&widget, 2), (&gadget, 3)], "tok_ok")
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    assert_eq!(placed["status"], "Pending");
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let position = placed["position"].as_str().unwrap();
    let (status, read) = c
        .get(&format!("/api/orders/{id}?min_position={position}"))
        .await;
    assert_eq!(status, StatusCode::OK, "read-your-writes: {read}");
    assert_eq!(read["customer_email"], "ada@example.com");
    assert_eq!(read["total"], "27.97");
    let order = c.finished(&id).await;
    assert_eq!(order["status"], "Completed", "{order}");
    assert!(order["completed_at"].is_string());
    assert_eq!(order["customer_email"], "ada@example.com");
    assert_eq!(order["items"][0]["unit_price"], "12.50");
    assert_eq!(order["items"][0]["product_name"], "Widget");
    c.stock_is(&widget, 8, 0).await;
    c.stock_is(&gadget, 2, 0).await;
    assert_eq!(c.emails(&id).await, ["OrderConfirmed"]);
    assert_eq!(c.payment_state(&id).await, "Authorised");
    let (code, events) = c.get(&format!("/api/orders/{id}/events")).await;
    assert_eq!(code, StatusCode::OK);
    let types: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "OrderCreated",
            "OrderInventoryConfirmed",
            "OrderPaymentConfirmed",
            "OrderCompleted"
        ]
    );
    assert_eq!(events[0]["position"].as_str(), Some(position), "{events}");
    // Card tokens are masked, authentication or not.
    assert_eq!(events[0]["data"]["card_token"], "***", "{events}");
    for e in events.as_array().unwrap() {
        assert_eq!(
            e["correlation_id"].as_str(),
            Some(id.as_str()),
            "one correlation id across hops"
        );
    }
    id
}

/// A line that cannot be reserved cancels the order with nothing held or
/// charged; restocked, the same order goes through.
pub async fn out_of_stock(c: &Client) {
    let plenty = c.product("Plenty", "1.00", 100).await;
    let scarce = c.product("Scarce", "2.00", 1).await;
    // Two lines: the first could be reserved, the second cannot: none is held.
    let id = c
        .place("bo@example.com", &[(&plenty, 3), (&scarce, 2)], "tok_ok")
        .await;
    let order = c.finished(&id).await;
    assert_eq!(order["status"], "Cancelled", "{order}");
    assert!(
        order["cancellation_reason"]
            .as_str()
            .unwrap()
            .contains("insufficient stock of Scarce"),
        "{order}"
    );
    c.stock_is(&plenty, 100, 0).await;
    c.stock_is(&scarce, 1, 0).await;
    assert_eq!(c.emails(&id).await, ["OrderCancelled"]);
    assert_eq!(c.payment_state(&id).await, "None", "nothing was charged");
    let (code, v) = c
        .post(
            &format!("/api/products/{scarce}/restock"),
            json!({"quantity": 4}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{v}");
    assert_eq!(v["available"], 5);
    let id = c
        .place("bo@example.com", &[(&plenty, 3), (&scarce, 2)], "tok_ok")
        .await;
    let order = c.finished(&id).await;
    assert_eq!(order["status"], "Completed", "{order}");
    assert_eq!(order["total"], "7.00");
}

/// A declined card cancels the order and releases its stock.
pub async fn declined_payment(c: &Client) {
    let widget = c.product("Widget", "5.00", 4).await;
    let id = c
        .place("cy@example.com", &[(&widget, 3)], "tok_decline")
        .await;
    let order = c.finished(&id).await;
    assert_eq!(order["status"], "Cancelled");
    assert_eq!(
        order["cancellation_reason"],
        "payment declined: card declined"
    );
    c.stock_is(&widget, 4, 0).await;
    assert_eq!(c.emails(&id).await, ["OrderCancelled"]);
    assert_eq!(c.payment_state(&id).await, "Declined");
}

/// The customer cancels an order waiting for its payment, or one whose
/// payment is on its way; cancelling again, a completed order or an unknown
/// one is refused.
pub async fn cancellation(c: &Client) {
    let widget = c.product("Widget", "5.00", 4).await;
    // The gateway never answers: the order waits in InventoryConfirmed.
    let id = c
        .place("di@example.com", &[(&widget, 2)], "tok_timeout")
        .await;
    c.wait_status(&id, "InventoryConfirmed").await;
    let mind = Some(json!({"reason": "changed my mind"}));
    let (code, body) = c.cancel(&id, mind.clone()).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "Cancelled");
    let (code, body) = c.cancel(&id, Some(json!({"reason": "again"}))).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "illegal_transition");
    let order = c.finished(&id).await;
    assert_eq!(order["status"], "Cancelled");
    assert_eq!(order["cancellation_reason"], "changed my mind");
    c.stock_is(&widget, 4, 0).await;
    let (code, body) = c.cancel(&id, None).await;
    assert_eq!(
        code,
        StatusCode::CONFLICT,
        "no body is fine, still illegal: {body}"
    );

    let done = c.place("di@example.com", &[(&widget, 1)], "tok_ok").await;
    assert_eq!(c.finished(&done).await["status"], "Completed");
    let (code, body) = c.cancel(&done, Some(json!({}))).await;
    assert_eq!(
        code,
        StatusCode::CONFLICT,
        "a completed order cannot be cancelled: {body}"
    );
    let (code, _) = c
        .cancel(&uuid::Uuid::now_v7().to_string(), Some(json!({})))
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // Cancelled while the gateway is still deciding: the payment it then
    // approves is refunded.
    let late = c
        .place("ivy@example.com", &[(&widget, 1)], "tok_delay_1500")
        .await;
    c.wait_status(&late, "InventoryConfirmed").await;
    let (code, body) = c.cancel(&late, mind).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let v = c.finished(&late).await;
    assert_eq!(v["status"], "Cancelled");
    assert_eq!(v["cancellation_reason"], "changed my mind");
    let (code, _) = c.cancel(&late, Some(json!({}))).await;
    assert_eq!(code, StatusCode::CONFLICT);
    c.payment_becomes(&late, "Refunded").await;
    c.stock_is(&widget, 3, 0).await;
}

/// No payment answer within the deployment's payment window cancels the
/// order; a payment that comes after it is refunded.
pub async fn payment_timeout(c: &Client) {
    let widget = c.product("Widget", "5.00", 5).await;
    let silent = c
        .place("ed@example.com", &[(&widget, 1)], "tok_timeout")
        .await;
    let late_token = format!("tok_delay_{}", c.payment_timeout().as_millis() + 500);
    let late = c
        .place("ed@example.com", &[(&widget, 1)], &late_token)
        .await;
    for id in [&silent, &late] {
        let order = c.finished(id).await;
        assert_eq!(order["status"], "Cancelled", "{order}");
        assert_eq!(order["cancellation_reason"], "payment timed out");
    }
    c.payment_becomes(&late, "Refunded").await;
    c.stock_is(&widget, 5, 0).await;
}

/// Bad input gets a 4xx with a JSON body that says what is wrong, and
/// changes nothing.
pub async fn bad_input(c: &Client) {
    let widget = c.product("Widget", "12.50", 10).await;
    // The largest price accepted: two of them are past the largest total.
    let yacht = c.product("Yacht", "100000000000.00", 10).await;
    c.settle().await;
    let written = c.written().await;
    let orders_before = c.stats().await["total_orders"].as_u64();
    let unknown = uuid::Uuid::now_v7().to_string();
    let base = Client::order_body("a@b.co", &[(&widget, 1)], "tok_ok");
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        match value {
            Value::Null => drop(body.as_object_mut().unwrap().remove(key)),
            value => body[key] = value,
        }
        body
    };
    let line =
        |product: &str, quantity: i64| json!([{"product_id": product, "quantity": quantity}]);
    let cases = [
        (with("items", json!([])), "items"),
        (with("items", line(&widget, 0)), "items[0].quantity"),
        (with("items", line(&widget, -3)), "items[0].quantity"),
        (
            with("customer_email", json!("not-an-email")),
            "customer_email",
        ),
        (with("items", line(&unknown, 1)), "unknown product"),
        (
            with("payment", json!({"card_token": ""})),
            "payment.card_token",
        ),
        (with("payment", Value::Null), "payment"),
        (with("total", json!("0.01")), "total"),
        (with("items", line(&yacht, 2)), "total"),
        (with("items", line("nope", 1)), "product_id"),
    ];
    for (body, mention) in cases {
        let (code, answer) = c.post("/api/orders", body.clone()).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(answer["code"].is_string(), "{answer}");
        assert!(
            message.contains(mention),
            "{body}: {message:?} should mention {mention:?}"
        );
    }
    let (_, answer) = c.order("not-an-email", &[(&widget, 1)], "tok_ok").await;
    assert_eq!(answer["field"], "customer_email", "{answer}");
    let (_, answer) = c.order("a@example.com", &[(&unknown, 1)], "tok_ok").await;
    assert_eq!(answer["code"], "unknown_product", "{answer}");
    // Malformed JSON, wrong content type, oversized bodies.
    let json_type = [("content-type", "application/json")];
    for body in [&b"{\"customer_email\": "[..], b"{not json"] {
        let (code, answer) = c
            .raw("POST", "/api/orders", &json_type, body.to_vec())
            .await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["code"], "malformed_json");
    }
    let text_type = [("content-type", "text/plain")];
    let (code, answer) = c
        .raw("POST", "/api/orders", &text_type, b"{}".to_vec())
        .await;
    assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{answer}");
    let big = format!("{{\"customer_email\":\"{}\"}}", "a".repeat(100_000));
    let (code, answer) = c
        .raw("POST", "/api/orders", &json_type, big.into_bytes())
        .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["code"], "body_too_large");
    let (code, answer) = c
        .raw("POST", "/api/products", &json_type, vec![b' '; 100_000])
        .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    // Bad products.
    for (body, field) in [
        (json!({"name": "X", "price": "1.234", "stock": 1}), "price"),
        (json!({"name": "X", "price": "-1", "stock": 1}), "price"),
        (json!({"name": "X", "price": "0", "stock": 1}), "price"),
        (json!({"name": "", "price": "1.00", "stock": 1}), "name"),
        (json!({"name": "X", "price": "1.00", "stock": -1}), "stock"),
    ] {
        let (code, answer) = c.post("/api/products", body.clone()).await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{body} -> {answer}");
        assert_eq!(answer["field"], field, "{answer}");
    }
    let (code, _) = c
        .post(
            &format!("/api/products/{widget}/restock"),
            json!({"quantity": 0}),
        )
        .await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    // A position no write answered is refused at once, not waited for.
    if c.knows_the_head() {
        let started = std::time::Instant::now();
        let (code, answer) = c
            .get(&format!("/api/orders/{unknown}?min_position=999999.0"))
            .await;
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert_eq!(answer["field"], "min_position", "{answer}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    // Unknown ids, query parameters of the wrong type, an unknown path (the
    // gateway answers one no service takes itself), a method a path does not
    // take: JSON errors too.
    let no_route = if c.behind_gateway() {
        "not_found"
    } else {
        "no_route"
    };
    let (missing, bad, invalid) = (
        StatusCode::NOT_FOUND,
        StatusCode::BAD_REQUEST,
        Some("invalid_query"),
    );
    let huge_limit = "/api/orders?status=Pending&limit=99999999999999999999999";
    for (uri, status, code) in [
        (
            "/api/products/not-a-uuid".into(),
            missing,
            Some("not_found"),
        ),
        ("/api/orders/not-a-uuid".into(), missing, None),
        (format!("/api/orders/{unknown}"), missing, None),
        (
            format!("/api/orders/{unknown}?min_position=nonsense"),
            bad,
            None,
        ),
        ("/api/orders?limit=abc".into(), bad, invalid),
        ("/api/orders?limit=-1".into(), bad, invalid),
        (huge_limit.into(), bad, invalid),
        (
            format!("/api/orders/{unknown}?wait_terminal_ms=soon"),
            bad,
            invalid,
        ),
        ("/api/nothing-here".into(), missing, Some(no_route)),
    ] {
        let (got, answer) = c.get(&uri).await;
        assert_eq!(got, status, "{uri} -> {answer}");
        if let Some(code) = code {
            assert_eq!(answer["code"], code, "{uri} -> {answer}");
        }
    }
    let (code, answer) = c.call("DELETE", "/api/orders", None, &[]).await;
    assert_eq!(
        (code, answer["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
    // Nothing was written by any of it.
    c.settle().await;
    assert_eq!(c.written().await, written);
    assert_eq!(c.stats().await["total_orders"].as_u64(), orders_before);
}

/// Text and values a hostile client would send: control characters (NUL,
/// CR/LF, ESC, DEL, backspace), bidirectional overrides, zero-width and
/// byte-order marks in every free-text field, malformed emails, card tokens
/// that would hold a payment handler, duplicate lines past the quantity
/// limit, wrong JSON types and hostile paths and query strings. Every one is
/// a 4xx with a JSON body naming the field where there is one, no 5xx,
/// nothing is written, and afterwards an order completes as usual.
pub async fn hostile_input(c: &Client) {
    let lamp = c.product("Hostile Lamp", "3.00", 100).await;
    c.settle().await;
    let written = c.written().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let hostile = [
        "\u{0}",
        "\r\n",
        "\n",
        "\u{1b}[31m",
        "\u{7f}",
        "\u{8}",
        "\u{202E}",
        "\u{200B}",
        "\u{FEFF}",
        "\u{2066}",
    ];
    let order = |email: &str, token: &str| Client::order_body(email, &[(&lamp, 1)], token);
    // (method, uri, body, the field the refusal must name, if any)
    let mut cases: Vec<(&str, String, Option<Value>, Option<&str>)> = Vec::new();
    for h in hostile {
        cases.push((
            "POST",
            "/api/orders".into(),
            Some(order(&format!("a{h}b@c.co"), "tok_ok")),
            Some("customer_email"),
        ));
        cases.push((
            "POST",
            "/api/orders".into(),
            Some(order("a@b.co", &format!("tok{h}ok"))),
            Some("payment.card_token"),
        ));
        cases.push((
            "POST",
            "/api/products".into(),
            Some(json!({"name": format!("Lamp{h}x"), "price": "1.00", "stock": 1})),
            Some("name"),
        ));
        cases.push((
            "POST",
            format!("/api/orders/{unknown}/cancel"),
            Some(json!({"reason": format!("late{h}again")})),
            Some("reason"),
        ));
        cases.push((
            "GET",
            format!("/api/orders/search?q=lamp{}x", urlencode(h)),
            None,
            Some("q"),
        ));
        cases.push((
            "GET",
            format!("/api/orders?customer_email=a{}b@c.co", urlencode(h)),
            None,
            Some("customer_email"),
        ));
    }
    for email in [
        ".a@b.co",
        "a.@b.co",
        "a..b@c.co",
        "a@b",
        "a@-b.co",
        "a@b_c.co",
        "a@b..co",
        "a\"b@c.co",
        "<a@b.co>",
        "a@b.co>",
        "a@@b.co",
        "@b.co",
        "a@.b.co",
        "a@b.co.",
    ] {
        cases.push((
            "POST",
            "/api/orders".into(),
            Some(order(email, "tok_ok")),
            Some("customer_email"),
        ));
    }
    for token in [
        "tok_delay_5001",
        "tok_delay_600000",
        "tok_delay_99999999999999999999",
        "tok_delay_-1",
        "tok_delay_1e3",
        "tok_delay_",
    ] {
        cases.push((
            "POST",
            "/api/orders".into(),
            Some(order("a@b.co", token)),
            Some("payment.card_token"),
        ));
    }
    for (n, quantity) in [(2, 6_000), (3, 5_000), (100, 10_000), (2, 10_000)] {
        let items: Vec<(&str, i64)> = (0..n).map(|_| (lamp.as_str(), quantity)).collect();
        cases.push((
            "POST",
            "/api/orders".into(),
            Some(Client::order_body("a@b.co", &items, "tok_ok")),
            Some("quantity"),
        ));
    }
    for (field, body) in [
        (
            "name",
            json!({"name": "x".repeat(201), "price": "1.00", "stock": 1}),
        ),
        ("price", json!({"name": "X", "price": "1e9", "stock": 1})),
        ("price", json!({"name": "X", "price": "NaN", "stock": 1})),
        ("price", json!({"name": "X", "price": "0x10", "stock": 1})),
        (
            "price",
            json!({"name": "X", "price": "\u{FF11}.00", "stock": 1}),
        ),
        (
            "price",
            json!({"name": "X", "price": "1.00\u{0}", "stock": 1}),
        ),
        (
            "stock",
            json!({"name": "X", "price": "1.00", "stock": 1_000_000_001}),
        ),
    ] {
        cases.push(("POST", "/api/products".into(), Some(body), Some(field)));
    }
    cases.push((
        "POST",
        format!("/api/orders/{unknown}/cancel"),
        Some(json!({"reason": "r".repeat(501)})),
        Some("reason"),
    ));
    cases.push((
        "POST",
        "/api/orders".into(),
        Some(order(&format!("{}@b.co", "a".repeat(65)), "tok_ok")),
        Some("customer_email"),
    ));
    cases.push((
        "POST",
        "/api/orders".into(),
        Some(order("a@b.co", &"t".repeat(101))),
        Some("payment.card_token"),
    ));
    for quantity in [
        json!(0),
        json!(-5),
        json!(1_000_000_001_i64),
        json!("5"),
        json!(1.5),
        json!(null),
    ] {
        cases.push((
            "POST",
            format!("/api/products/{lamp}/restock"),
            Some(json!({"quantity": quantity})),
            None,
        ));
    }
    // Wrong JSON shapes: each a 4xx, none a 5xx.
    for body in [
        json!({"customer_email": "a@b.co", "items": [{"product_id": lamp, "quantity": "1"}], "payment": {"card_token": "tok_ok"}}),
        json!({"customer_email": "a@b.co", "items": [{"product_id": lamp, "quantity": 1e300}], "payment": {"card_token": "tok_ok"}}),
        json!({"customer_email": "a@b.co", "items": {"product_id": lamp}, "payment": {"card_token": "tok_ok"}}),
        json!({"customer_email": "a@b.co", "items": [null], "payment": {"card_token": "tok_ok"}}),
        json!({"customer_email": ["a@b.co"], "items": [], "payment": {"card_token": "tok_ok"}}),
        json!({"customer_email": "a@b.co", "items": [{"product_id": lamp, "quantity": 1}], "payment": "tok_ok"}),
        json!([1, 2, 3]),
        json!("just a string"),
        json!(null),
        json!({}),
    ] {
        cases.push(("POST", "/api/orders".into(), Some(body), None));
    }
    let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
    for uri in [
        "/api/orders/../../etc/passwd".to_owned(),
        "/api/products/%00".to_owned(),
        format!("/api/orders/{unknown}%0d%0aSet-Cookie:x"),
        "/api/orders?limit=0".to_owned(),
        "/api/orders?status=%00".to_owned(),
        "/api/orders?cursor=%1b%5b31m".to_owned(),
        format!("/api/orders/search?q={}", "q".repeat(101)),
        "/api/orders/search?q=%20%20".to_owned(),
        format!("/api/orders/{unknown}?min_position=1.2.3"),
        format!("/api/orders/{unknown}?wait_terminal_ms=-1"),
    ] {
        cases.push(("GET", uri, None, None));
    }
    assert!(cases.len() >= 100, "only {} hostile inputs", cases.len());
    for (method, uri, body, field) in &cases {
        let (code, answer) = c.call(method, uri, body.clone(), &[]).await;
        assert!(
            code.is_client_error(),
            "{method} {uri} {body:?} -> {code} {answer}"
        );
        assert!(
            answer["code"].is_string(),
            "{method} {uri} {body:?} -> {answer}"
        );
        if let Some(field) = field {
            let named = answer["field"].as_str().unwrap_or_default();
            assert!(
                named.contains(field),
                "{method} {uri} {body:?} -> {answer}: should name {field}"
            );
        }
    }
    // The deepest JSON is refused too, as malformed, not by a crash.
    let (code, answer) = c
        .raw(
            "POST",
            "/api/orders",
            &[("content-type", "application/json")],
            deep.into_bytes(),
        )
        .await;
    assert!(code.is_client_error(), "{code} {answer}");
    c.settle().await;
    assert_eq!(
        c.written().await,
        written,
        "a refused request wrote something"
    );
    // And the system still serves: an order completes.
    let id = c
        .place(
            &format!("after-hostile-{}@example.com", tag()),
            &[(&lamp, 1)],
            "tok_ok",
        )
        .await;
    assert_eq!(c.finished(&id).await["status"], "Completed");
}

/// `s` percent-encoded for a query string.
fn urlencode(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// A key answers its first answer again; another body under it is refused;
/// concurrent retries with one key create one order.
pub async fn idempotency_keys(c: &Client) {
    let widget = c.product("Widget", "2.00", 100).await;
    let orders_before = c.stats().await["total_orders"].as_u64().unwrap();
    let body = Client::order_body("ivy@example.com", &[(&widget, 1)], "tok_ok");
    let key = format!("order-{}", tag());
    let key = [("idempotency-key", key.as_str())];
    let (code, first) = c
        .call("POST", "/api/orders", Some(body.clone()), &key)
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{first}");
    let (code, again) = c
        .call("POST", "/api/orders", Some(body.clone()), &key)
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(
        first, again,
        "the same key and body answer the first answer"
    );
    let mut other = body.clone();
    other["items"][0]["quantity"] = json!(2);
    let (code, answer) = c.call("POST", "/api/orders", Some(other), &key).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["code"], "idempotency_key_reused");
    // Concurrent retries with one key create one order.
    let burst = format!("burst-{}", tag());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (c, body, burst) = (c.clone(), body.clone(), burst.clone());
        tasks.push(tokio::spawn(async move {
            let (code, placed) = c
                .call(
                    "POST",
                    "/api/orders",
                    Some(body),
                    &[("idempotency-key", &burst)],
                )
                .await;
            assert_eq!(code, StatusCode::ACCEPTED, "{placed}");
            placed["order_id"].as_str().unwrap().to_owned()
        }));
    }
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "one order for one key");
    let order = c.finished(first["order_id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "Completed");
    for id in &ids {
        c.finished(id).await;
    }
    c.stock_is(&widget, 98, 0).await;
    let stats = c.stats().await;
    assert_eq!(
        stats["total_orders"].as_u64(),
        Some(orders_before + 2),
        "{stats}"
    );
}

/// A promotion code is redeemed once per customer across all their orders:
/// a second order with it is 409, whatever its spelling and however many
/// race for it; other customers and other codes are not affected, and a
/// retry under the same idempotency key is the same order, not a second use.
pub async fn promotion_codes(c: &Client) {
    let widget = c.product("Widget", "1.00", 100).await;
    let (code, other_code) = (format!("SPRING-{}", tag()), format!("SUMMER-{}", tag()));
    let with_code = |email: &str, code: &str| {
        let mut body = Client::order_body(email, &[(&widget, 1)], "tok_ok");
        body["promotion_code"] = json!(code);
        body
    };
    let (ada, bob) = (
        format!("ada-{}@example.com", tag()),
        format!("bob-{}@example.com", tag()),
    );

    let (status, first) = c.post("/api/orders", with_code(&ada, &code)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let (status, again) = c
        .post("/api/orders", with_code(&ada, &code.to_lowercase()))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert_eq!(again["code"], "promotion_already_redeemed", "{again}");
    for (email, code) in [(&bob, &code), (&ada, &other_code)] {
        let (status, placed) = c.post("/api/orders", with_code(email, code)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{email} {code}: {placed}");
    }
    let (status, bad) = c.post("/api/orders", with_code(&ada, "no spaces")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
    assert_eq!(bad["field"], "promotion_code", "{bad}");

    // The same request under one idempotency key is one order, one use.
    let carol = format!("carol-{}@example.com", tag());
    let key = format!("promo-{}", tag());
    let mut answers = Vec::new();
    for _ in 0..2 {
        let (status, placed) = c
            .call(
                "POST",
                "/api/orders",
                Some(with_code(&carol, &code)),
                &[("idempotency-key", &key)],
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
        answers.push(placed);
    }
    assert_eq!(answers[0], answers[1]);

    // Racing orders of one customer with one code: exactly one is placed.
    let (dan, racing) = (
        format!("dan-{}@example.com", tag()),
        format!("RACE-{}", tag()),
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, body) = (c.clone(), with_code(&dan, &racing));
        tasks.push(tokio::spawn(
            async move { c.post("/api/orders", body).await },
        ));
    }
    let mut placed = Vec::new();
    for task in tasks {
        let (status, answer) = task.await.unwrap();
        match status {
            StatusCode::ACCEPTED => placed.push(answer["order_id"].as_str().unwrap().to_owned()),
            StatusCode::CONFLICT => assert_eq!(answer["code"], "promotion_already_redeemed"),
            other => panic!("{other}: {answer}"),
        }
    }
    assert_eq!(placed.len(), 1, "one of 8 racing orders redeems the code");
    for id in [first["order_id"].as_str().unwrap(), placed[0].as_str()] {
        assert_eq!(c.finished(id).await["status"], "Completed");
    }
}

/// A customer's orders page by page, newest first; the status filter,
/// search and stats.
pub async fn queries(c: &Client) {
    let t = tag();
    let widget = c.product(&format!("Blue Widget-{t}"), "10.00", 100).await;
    let gizmo = c.product(&format!("Gizmo-{t}"), "1.25", 100).await;
    let (fay, gus) = (
        format!("fay-{t}@example.com"),
        format!("gus-{t}@example.com"),
    );
    let before = c.stats().await;
    let cancelled_before = c.count_orders("status=Cancelled").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let token = if i == 4 { "tok_decline" } else { "tok_ok" };
        ids.push(c.place(&fay, &[(&widget, 1)], token).await);
    }
    ids.push(c.place(&gus, &[(&gizmo, 2)], "tok_ok").await);
    for id in &ids {
        c.finished(id).await;
    }
    // Paging through a customer's orders, newest first.
    let (code, page) = c
        .get(&format!(
            "/api/orders?customer_email={}&limit=2",
            fay.to_uppercase()
        ))
        .await;
    assert_eq!(code, StatusCode::OK, "{page}");
    let mut listed: Vec<Value> = page["orders"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 2);
    let mut cursor = page["next_cursor"].as_str().unwrap().to_owned();
    loop {
        let (_, page) = c
            .get(&format!(
                "/api/orders?customer_email={fay}&limit=2&cursor={cursor}"
            ))
            .await;
        listed.extend(page["orders"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    let listed: Vec<&str> = listed
        .iter()
        .map(|o| o["order_id"].as_str().unwrap())
        .collect();
    let newest_first: Vec<&str> = ids[..5].iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(
        c.count_orders("status=Cancelled").await,
        cancelled_before + 1
    );
    let (code, _) = c.get("/api/orders?status=Shipped").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (_, found) = c.get(&format!("/api/orders/search?q=widget-{t}")).await;
    assert_eq!(found["orders"].as_array().unwrap().len(), 5, "{found}");
    let (_, found) = c.get(&format!("/api/orders/search?q=gus-{t}@")).await;
    assert_eq!(found["orders"].as_array().unwrap().len(), 1, "{found}");
    let (code, _) = c.get("/api/orders/search?q=").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let stats = c.stats().await;
    let count = |s: &Value, status: &str| s["by_status"][status]["count"].as_u64().unwrap_or(0);
    let revenue = |s: &Value| cents(&s["by_status"]["Completed"]["revenue"]);
    assert_eq!(
        stats["total_orders"].as_u64().unwrap(),
        before["total_orders"].as_u64().unwrap() + 6,
        "{stats}"
    );
    assert_eq!(count(&stats, "Completed"), count(&before, "Completed") + 5);
    assert_eq!(revenue(&stats), revenue(&before) + 42_50, "{stats}");
    assert_eq!(count(&stats, "Cancelled"), count(&before, "Cancelled") + 1);
    assert_eq!(stats["by_status"]["Pending"]["count"], 0, "{stats}");
}

/// Health, the metrics of an order's path and the OpenAPI document of every
/// operation.
pub async fn health_metrics_and_openapi(c: &Client) {
    let widget = c.product("Widget", "1.00", 10).await;
    let id = c.place("hal@example.com", &[(&widget, 1)], "tok_ok").await;
    c.finished(&id).await;
    let (code, health) = c.get("/health").await;
    assert_eq!(
        (code, health["status"].as_str()),
        (StatusCode::OK, Some("ok")),
        "{health}"
    );
    let (code, text) = c.get("/metrics").await;
    assert_eq!(code, StatusCode::OK);
    let text = text.as_str().unwrap();
    let common = [
        "orders_placed_total",
        "orders_finished_total",
        "saga_step_seconds",
        "order_end_to_end_seconds",
    ];
    for metric in common.iter().chain(c.extra_metrics()) {
        assert!(text.contains(metric), "{metric} missing from /metrics");
    }
    for metric in c.counted_metrics() {
        let counted = text.lines().any(|line| {
            line.starts_with(&format!("{metric}{{"))
                && line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
        });
        assert!(
            counted,
            "no sample of {metric} above zero in /metrics:\n{text}"
        );
    }
    let (code, doc) = c.get("/openapi.json").await;
    assert_eq!(code, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/products",
        "/api/products/{id}",
        "/api/products/{id}/restock",
        "/api/orders",
        "/api/orders/{id}",
        "/api/orders/search",
        "/api/orders/{id}/events",
        "/api/orders/{id}/cancel",
        "/api/stats",
        "/health",
        "/metrics",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(
        paths["/api/orders"]["get"].is_object() && paths["/api/orders"]["post"].is_object(),
        "both services' /api/orders operations"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "{doc}"
    );
    assert!(paths["/api/stats"]["get"]["security"].is_array());
    assert!(paths["/health"]["get"].get("security").is_none());
}

/// A request with `authorization` set to `auth`.
async fn authorised(
    c: &Client,
    auth: &str,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    c.call(method, uri, body, &[("authorization", auth)]).await
}

/// `Bearer <token>` for `claims`, signed with `secret`.
pub fn bearer(secret: &str, claims: &orders::auth::Claims) -> String {
    format!("Bearer {}", orders::auth::mint(secret, claims).unwrap())
}

/// On a deployment that requires bearer tokens signed with `secret`: 401
/// without a valid token (none, forged, expired), 403 for a customer on an
/// admin route or on another customer's order, and what each role may do.
pub async fn authentication(c: &Client, secret: &str) {
    use orders::auth::{Claims, ADMIN, CUSTOMER};
    let ten_minutes = std::time::Duration::from_secs(600);
    let t = tag();
    let (ada_email, bob_email) = (
        format!("ada-{t}@example.com"),
        format!("bob-{t}@example.com"),
    );
    let admin = bearer(secret, &Claims::new(ADMIN, None, ten_minutes));
    let ada = bearer(
        secret,
        &Claims::new(CUSTOMER, Some(&ada_email), ten_minutes),
    );
    let bob = bearer(
        secret,
        &Claims::new(CUSTOMER, Some(&bob_email), ten_minutes),
    );

    // Health, metrics and the OpenAPI document stay open.
    for open in ["/health", "/metrics", "/openapi.json"] {
        let (code, body) = c.get(open).await;
        assert_eq!(code, StatusCode::OK, "{open}: {body}");
    }
    // No token, a forged one, an expired one, not a JWT: 401.
    let forged = bearer(
        &format!("{secret}-forged"),
        &Claims::new(ADMIN, None, ten_minutes),
    );
    let mut expired = Claims::new(ADMIN, None, ten_minutes);
    expired.exp -= 7200;
    let expired = bearer(secret, &expired);
    let (code, body) = c.get("/api/orders").await;
    assert_eq!(code, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "missing_token");
    let (code, body) = c
        .post(
            "/api/products",
            json!({"name": "Free", "price": "1.00", "stock": 1}),
        )
        .await;
    assert_eq!(
        (code, body["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_token"))
    );
    for (auth, want) in [
        (forged.as_str(), "invalid_token"),
        ("Bearer not-a-token", "invalid_token"),
        (expired.as_str(), "token_expired"),
    ] {
        let (code, body) = authorised(c, auth, "GET", "/api/stats", None).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{want}: {body}");
        assert_eq!(body["code"], want, "{body}");
    }

    // Product and stock changes, search and stats: the admin's.
    let new_product = json!({"name": format!("Guarded {t}"), "price": "4.00", "stock": 5});
    let (code, body) = authorised(
        c,
        &admin,
        "POST",
        "/api/products",
        Some(new_product.clone()),
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    let widget = body["product_id"].as_str().unwrap().to_owned();
    c.await_product(&widget).await;
    let restock = format!("/api/products/{widget}/restock");
    let (code, body) = authorised(c, &admin, "POST", &restock, Some(json!({"quantity": 1}))).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, body) = authorised(c, &ada, "GET", &format!("/api/products/{widget}"), None).await;
    assert_eq!(
        (code, body["available"].as_u64()),
        (StatusCode::OK, Some(6)),
        "{body}"
    );
    c.settle().await;
    let before = c.written().await;
    for (method, uri, body) in [
        ("POST", "/api/products", Some(new_product)),
        ("POST", restock.as_str(), Some(json!({"quantity": 1}))),
        ("GET", "/api/stats", None),
        ("GET", "/api/orders/search?q=guarded", None),
    ] {
        let (code, answer) = authorised(c, &ada, method, uri, body).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{method} {uri}: {answer}");
        assert_eq!(answer["code"], "forbidden");
    }
    // A customer orders in their own email only.
    let as_bob = Client::order_body(&bob_email, &[(&widget, 1)], "tok_ok");
    let (code, body) = authorised(c, &ada, "POST", "/api/orders", Some(as_bob)).await;
    assert_eq!(
        (code, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{body}"
    );
    assert_eq!(
        c.written().await,
        before,
        "a refused request writes nothing"
    );
    for (method, uri) in [
        ("GET", "/api/stats"),
        ("GET", "/api/orders/search?q=guarded"),
    ] {
        let (code, body) = authorised(c, &admin, method, uri, None).await;
        assert_eq!(code, StatusCode::OK, "{uri}: {body}");
    }

    // Ada's order (its payment never answers: it stays open to cancel).
    let mine = Client::order_body(&ada_email.to_uppercase(), &[(&widget, 2)], "tok_timeout");
    let (code, placed) = authorised(c, &ada, "POST", "/api/orders", Some(mine)).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{placed}");
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let position = placed["position"].as_str().unwrap();
    let (code, view) = authorised(
        c,
        &ada,
        "GET",
        &format!("/api/orders/{id}?min_position={position}"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{view}");
    assert_eq!(view["customer_email"], ada_email.as_str());
    let (code, view) = authorised(c, &admin, "GET", &format!("/api/orders/{id}"), None).await;
    assert_eq!(code, StatusCode::OK, "{view}");
    let events = format!("/api/orders/{id}/events");
    let (code, history) = authorised(c, &ada, "GET", &events, None).await;
    assert_eq!(code, StatusCode::OK, "{history}");
    assert_eq!(history[0]["data"]["card_token"], "***", "{history}");
    assert!(!history.to_string().contains("tok_timeout"), "{history}");
    // Bob sees, lists and cancels none of it.
    for uri in [format!("/api/orders/{id}"), events.clone()] {
        let (code, body) = authorised(c, &bob, "GET", &uri, None).await;
        assert_eq!(
            (code, body["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("forbidden")),
            "{uri}: {body}"
        );
    }
    let (code, body) = authorised(
        c,
        &bob,
        "GET",
        &format!("/api/orders?customer_email={ada_email}"),
        None,
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
    let (code, page) = authorised(c, &bob, "GET", "/api/orders", None).await;
    assert_eq!(code, StatusCode::OK, "{page}");
    assert_eq!(page["orders"].as_array().unwrap().len(), 0, "{page}");
    let cancel = format!("/api/orders/{id}/cancel");
    let (code, body) = authorised(
        c,
        &bob,
        "POST",
        &cancel,
        Some(json!({"reason": "mine now"})),
    )
    .await;
    assert_eq!(
        (code, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{body}"
    );
    // Ada's list is hers; the admin lists anyone's.
    let (code, page) = authorised(c, &ada, "GET", "/api/orders", None).await;
    assert_eq!(code, StatusCode::OK, "{page}");
    let listed: Vec<&str> = page["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [id.as_str()], "{page}");
    let (code, page) = authorised(
        c,
        &admin,
        "GET",
        &format!("/api/orders?customer_email={ada_email}"),
        None,
    )
    .await;
    assert_eq!(
        (code, page["orders"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1)),
        "{page}"
    );
    // Ada cancels her own.
    let (code, body) = authorised(
        c,
        &ada,
        "POST",
        &cancel,
        Some(json!({"reason": "changed my mind"})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "Cancelled");
    let (code, body) = authorised(c, &admin, "POST", &cancel, None).await;
    assert_eq!(code, StatusCode::CONFLICT, "{body}");
}
