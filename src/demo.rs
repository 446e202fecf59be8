//! The synthetic upstream relayhub serves itself, so the default config shows moving data with no internet:
//! `GET /demo/prices/{symbol}` (a quote) and `GET /demo/chain/{symbol}` (an option chain, for the `/data`
//! and `diff:strike` transforms). Every request moves that symbol's random walk a step. Mounted by the app.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use actix_web::{HttpResponse, web};
use chrono::{Datelike, Days, NaiveDate, SecondsFormat, Utc};
use serde_json::{Value, json};

/// Longest accepted symbol.
const MAX_SYMBOL_LEN: usize = 12;

/// Symbols remembered at most; past that, one old symbol is forgotten for each new one, so arbitrary paths
/// cannot grow the state without bound.
const MAX_SYMBOLS: usize = 1024;

/// Strikes in a chain: the one nearest the underlying and three on each side.
const STRIKES_EACH_SIDE: i64 = 3;

/// Largest relative move of a price per request (0.2 %).
const PRICE_STEP: f64 = 0.002;

/// Starting prices of well-known symbols; any other symbol starts at 100.
const STARTING_PRICES: &[(&str, f64)] = &[
    ("BTC", 64012.53),
    ("ETH", 3150.20),
    ("SOL", 145.80),
    ("DOGE", 0.1580),
    ("EURUSD", 1.0850),
    ("GBPUSD", 1.2710),
    ("USDJPY", 151.30),
    ("XAU", 2350.40),
    ("AAPL", 189.50),
    ("MSFT", 415.30),
    ("GOOGL", 172.10),
    ("AMZN", 183.60),
    ("NVDA", 121.40),
    ("TSLA", 178.20),
    ("SPY", 528.70),
    ("QQQ", 452.90),
    ("NIFTY", 24350.0),
    ("BANKNIFTY", 52150.0),
    ("SENSEX", 80120.0),
];

/// Price of a symbol not in [`STARTING_PRICES`].
const DEFAULT_PRICE: f64 = 100.0;

/// Shared state of the demo endpoints: every symbol's random walks.
pub struct DemoState {
    /// Locked for the few microseconds a request takes to move its walk.
    markets: Mutex<Markets>,
}

impl DemoState {
    /// Fresh state: walks start from the starting prices on first use.
    pub fn new() -> DemoState {
        DemoState {
            markets: Mutex::new(Markets {
                rng: Rng::new(),
                quotes: HashMap::new(),
                chains: HashMap::new(),
            }),
        }
    }
}

impl Default for DemoState {
    fn default() -> Self {
        DemoState::new()
    }
}

/// Registers the demo routes over the given state. The app factory runs once per worker: the state is created
/// once outside it, so there is one walk per symbol across workers.
pub fn configure_with(cfg: &mut web::ServiceConfig, state: web::Data<DemoState>) {
    cfg.service(
        web::resource("/demo/prices/{symbol}")
            .app_data(state.clone())
            .route(web::get().to(prices)),
    )
    .service(
        web::resource("/demo/chain/{symbol}")
            .app_data(state)
            .route(web::get().to(chain)),
    );
}

/// `GET /demo/prices/{symbol}`: one quote, e.g. `{"symbol":"BTC","price":64012.53,"change":12.4,
/// "volume":1520,"bid":64011.25,"ask":64013.81,"time":"2025-11-21T10:00:00.123Z"}`; `change` is since the
/// first quote of the symbol.
async fn prices(state: web::Data<DemoState>, symbol: web::Path<String>) -> HttpResponse {
    let Some(symbol) = normalize_symbol(&symbol) else {
        return invalid_symbol();
    };
    let mut markets = state.markets.lock().unwrap_or_else(PoisonError::into_inner);
    let body = markets.next_quote(&symbol);
    HttpResponse::Ok().json(body)
}

/// `GET /demo/chain/{symbol}`: `{"symbol":..,"expiry":"YYYY-MM-DD","underlying":..,"time":..,
/// "data":[{"strike":..,"ltp":..,"oi":..,"iv":..}, ...]}` with 7 strikes around the underlying; as it
/// moves, strikes at the edges come and go.
async fn chain(state: web::Data<DemoState>, symbol: web::Path<String>) -> HttpResponse {
    let Some(symbol) = normalize_symbol(&symbol) else {
        return invalid_symbol();
    };
    let today = Utc::now().date_naive();
    let mut markets = state.markets.lock().unwrap_or_else(PoisonError::into_inner);
    let body = markets.next_chain(&symbol, today);
    HttpResponse::Ok().json(body)
}

/// The upper-cased symbol, or `None` for anything but 1-12 ASCII letters and digits.
fn normalize_symbol(symbol: &str) -> Option<String> {
    let valid = (1..=MAX_SYMBOL_LEN).contains(&symbol.len())
        && symbol.bytes().all(|b| b.is_ascii_alphanumeric());
    valid.then(|| symbol.to_ascii_uppercase())
}

/// The 400 JSON error for a symbol that [`normalize_symbol`] rejects.
fn invalid_symbol() -> HttpResponse {
    HttpResponse::BadRequest().json(json!({
        "error": format!("invalid symbol: use 1 to {MAX_SYMBOL_LEN} letters or digits"),
    }))
}

/// Every symbol's walks, behind [`DemoState`]'s mutex.
struct Markets {
    /// Source of every random step.
    rng: Rng,
    /// Quote walks by symbol.
    quotes: HashMap<String, Quote>,
    /// Option chain walks by symbol, independent of the quotes.
    chains: HashMap<String, Chain>,
}

/// One symbol's quote walk.
struct Quote {
    /// Current price.
    price: f64,
    /// First price, the base of `change`.
    open: f64,
    /// Units traded so far.
    volume: u64,
}

/// One symbol's option chain walk.
struct Chain {
    /// Current underlying price.
    spot: f64,
    /// Distance between strikes, fixed when the chain is created.
    step: f64,
    /// Open interest by strike index (strike = index * step).
    oi: BTreeMap<i64, u64>,
    /// Implied volatility by strike index.
    iv: BTreeMap<i64, f64>,
}

impl Markets {
    /// Moves `symbol`'s quote a step and returns it as JSON.
    fn next_quote(&mut self, symbol: &str) -> Value {
        make_room(&mut self.quotes, symbol);
        let rng = &mut self.rng;
        let quote = self.quotes.entry(symbol.to_owned()).or_insert_with(|| {
            let price = starting_price(symbol);
            Quote {
                price,
                open: price,
                volume: 0,
            }
        });
        quote.price = walk(quote.price, PRICE_STEP, rng);
        quote.volume += 1 + (rng.unit() * 1000.0) as u64;
        let price = quote.price;
        let places = decimals(price);
        let half_spread = (price * 0.0001).max(10f64.powi(-places));
        json!({
            "symbol": symbol,
            "price": round_to(price, places),
            "change": round_to(price - quote.open, places),
            "volume": quote.volume,
            "bid": round_to(price - half_spread, places),
            "ask": round_to(price + half_spread, places),
            "time": now_rfc3339(),
        })
    }

    /// Moves `symbol`'s chain a step and returns it as JSON, with the expiry computed from `today`.
    fn next_chain(&mut self, symbol: &str, today: NaiveDate) -> Value {
        make_room(&mut self.chains, symbol);
        let rng = &mut self.rng;
        let chain = self.chains.entry(symbol.to_owned()).or_insert_with(|| {
            let spot = starting_price(symbol);
            Chain {
                spot,
                step: strike_step(spot),
                oi: BTreeMap::new(),
                iv: BTreeMap::new(),
            }
        });
        chain.spot = walk(chain.spot, PRICE_STEP, rng);
        let expiry = next_expiry(today);
        // At least a day of time value, so the chain never collapses to intrinsic values.
        let years = ((expiry - today).num_days().max(1)) as f64 / 365.0;
        let center = (chain.spot / chain.step).round() as i64;
        let strikes = (center - STRIKES_EACH_SIDE)..=(center + STRIKES_EACH_SIDE);
        // Forget strikes that left the window, so a strike that comes back starts afresh.
        chain.oi.retain(|index, _| strikes.contains(index));
        chain.iv.retain(|index, _| strikes.contains(index));
        let mut rows = Vec::new();
        for index in strikes {
            let distance = (index - center).unsigned_abs() as f64;
            let oi = chain
                .oi
                .entry(index)
                .or_insert_with(|| 1000 + (rng.unit() * 50_000.0) as u64);
            // Open interest drifts by up to ±2 % a step.
            let drift = (*oi as f64 * 0.02 * (2.0 * rng.unit() - 1.0)).round() as i64;
            *oi = oi.saturating_add_signed(drift).max(100);
            let iv = chain
                .iv
                .entry(index)
                .or_insert_with(|| 0.14 + 0.01 * distance);
            *iv = (*iv + 0.002 * (2.0 * rng.unit() - 1.0)).clamp(0.05, 0.9);
            let strike = index as f64 * chain.step;
            let ltp = call_price(chain.spot, strike, *iv, years).max(0.05);
            rows.push(json!({
                "strike": strike_json(strike, chain.step),
                "ltp": round_to(ltp, 2),
                "oi": *oi,
                "iv": round_to(*iv, 4),
            }));
        }
        json!({
            "symbol": symbol,
            "expiry": expiry.format("%Y-%m-%d").to_string(),
            "underlying": round_to(chain.spot, decimals(chain.spot)),
            "time": now_rfc3339(),
            "data": rows,
        })
    }
}

/// Forgets one remembered symbol when the map is full and `symbol` is new.
fn make_room<V>(map: &mut HashMap<String, V>, symbol: &str) {
    if map.len() >= MAX_SYMBOLS
        && !map.contains_key(symbol)
        && let Some(old) = map.keys().next().cloned()
    {
        map.remove(&old);
    }
}

/// The starting price of a (normalized) symbol.
fn starting_price(symbol: &str) -> f64 {
    STARTING_PRICES
        .iter()
        .find(|(name, _)| *name == symbol)
        .map_or(DEFAULT_PRICE, |(_, price)| *price)
}

/// One step of a multiplicative random walk: `price` moves by up to `max_move` (relative), either way.
fn walk(price: f64, max_move: f64, rng: &mut Rng) -> f64 {
    (price * (1.0 + max_move * (2.0 * rng.unit() - 1.0))).max(0.0001)
}

/// Decimal places a price is quoted with: 2, or 4 below 10.
fn decimals(price: f64) -> i32 {
    if price >= 10.0 { 2 } else { 4 }
}

/// `x` rounded to `places` decimal places.
fn round_to(x: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    let rounded = (x * scale).round() / scale;
    // Avoids a "-0.0" change.
    if rounded == 0.0 { 0.0 } else { rounded }
}

/// A round distance between strikes of about 0.5 % of the price: 1, 2 or 5 times a power of ten.
fn strike_step(price: f64) -> f64 {
    let target = price * 0.005;
    let magnitude = 10f64.powf(target.log10().floor());
    let step = [5.0, 2.0, 1.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|step| *step <= target)
        .unwrap_or(magnitude);
    // Exact decimals such as 0.0005 instead of 0.0005000000000000001.
    format!("{step:.1e}").parse().unwrap_or(step)
}

/// A strike as JSON: an integer when the step is whole, else a float without binary noise.
fn strike_json(strike: f64, step: f64) -> Value {
    if step >= 1.0 {
        json!(strike.round() as i64)
    } else {
        json!(format!("{strike:.6}").parse::<f64>().unwrap_or(strike))
    }
}

/// The next weekly expiry: the first Thursday after `today`.
fn next_expiry(today: NaiveDate) -> NaiveDate {
    let from_monday = i64::from(today.weekday().num_days_from_monday());
    let ahead = (3 - from_monday).rem_euclid(7);
    let ahead = if ahead == 0 { 7 } else { ahead };
    // `ahead` is 1..=7, and adding a week cannot leave chrono's date range for any real date.
    today
        .checked_add_days(Days::new(ahead as u64))
        .unwrap_or(today)
}

/// A call option price under the Bachelier (normal) model, plausible enough for a demo.
fn call_price(spot: f64, strike: f64, iv: f64, years: f64) -> f64 {
    let sigma = spot * iv * years.sqrt();
    let d = (spot - strike) / sigma;
    (spot - strike) * normal_cdf(d) + sigma * normal_pdf(d)
}

/// The standard normal density.
fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// The standard normal distribution function (Abramowitz and Stegun 26.2.17, error below 1e-7).
fn normal_cdf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.231_641_9 * x.abs());
    let poly = t
        * (0.319_381_530
            + t * (-0.356_563_782
                + t * (1.781_477_937 + t * (-1.821_255_978 + t * 1.330_274_429))));
    let upper_tail = normal_pdf(x) * poly;
    if x >= 0.0 {
        1.0 - upper_tail
    } else {
        upper_tail
    }
}

/// The current time as RFC 3339 in UTC with milliseconds.
fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A small xorshift64* generator with a random seed; plenty for demo data.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        // `| 1`: xorshift must not start at zero.
        Rng(crate::core::random::u64() | 1)
    }

    /// A pseudo-random number in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo routes with their own fresh state.
    fn configure(cfg: &mut web::ServiceConfig) {
        configure_with(cfg, web::Data::new(DemoState::new()));
    }
    use actix_web::App;
    use actix_web::http::StatusCode;
    use actix_web::test as actix_test;

    /// GETs `$uri` from the test service `$app`; gives the status and the JSON body.
    macro_rules! get_json {
        ($app:expr, $uri:expr) => {
            read_json(
                actix_test::call_service(
                    $app,
                    actix_test::TestRequest::get().uri($uri).to_request(),
                )
                .await,
            )
            .await
        };
    }

    async fn read_json(response: actix_web::dev::ServiceResponse) -> (StatusCode, Value) {
        let status = response.status();
        let body = actix_test::read_body(response).await;
        (status, serde_json::from_slice(&body).expect("JSON body"))
    }

    #[actix_web::test]
    async fn prices_walk_per_symbol() {
        let app = actix_test::init_service(App::new().configure(configure)).await;
        let (status, first) = get_json!(&app, "/demo/prices/BTC");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first["symbol"], "BTC");
        let price = first["price"].as_f64().unwrap();
        assert!(
            (price - 64012.53).abs() <= 64012.53 * PRICE_STEP + 0.01,
            "{price}"
        );
        let (bid, ask) = (
            first["bid"].as_f64().unwrap(),
            first["ask"].as_f64().unwrap(),
        );
        assert!(bid < price && price < ask, "{first}");
        assert!(first["volume"].as_u64().unwrap() >= 1);
        assert!(first["change"].is_f64());
        let time = first["time"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{time}");

        let mut prices = vec![price];
        let mut volume = first["volume"].as_u64().unwrap();
        for _ in 0..10 {
            let (_, quote) = get_json!(&app, "/demo/prices/btc");
            assert_eq!(quote["symbol"], "BTC");
            let v = quote["volume"].as_u64().unwrap();
            assert!(v > volume, "volume only grows");
            volume = v;
            prices.push(quote["price"].as_f64().unwrap());
        }
        prices.dedup();
        assert!(prices.len() > 5, "the price moves: {prices:?}");

        // Unknown symbols start at 100; each symbol walks on its own.
        let (_, other) = get_json!(&app, "/demo/prices/ZZZ9");
        let p = other["price"].as_f64().unwrap();
        assert!((p - 100.0).abs() <= 100.0 * PRICE_STEP + 0.01, "{p}");
        let (_, fx) = get_json!(&app, "/demo/prices/EURUSD");
        assert!((fx["price"].as_f64().unwrap() - 1.085).abs() < 0.01, "{fx}");
    }

    #[actix_web::test]
    async fn invalid_symbols_are_400_json() {
        let app = actix_test::init_service(App::new().configure(configure)).await;
        for uri in [
            "/demo/prices/BTC-USD",
            "/demo/prices/ABCDEFGHIJKLM",
            "/demo/prices/BT%20C",
            "/demo/chain/N.IFTY",
            "/demo/chain/%C3%A9",
        ] {
            let (status, body) = get_json!(&app, uri);
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert!(
                body["error"].as_str().unwrap().contains("invalid symbol"),
                "{uri}"
            );
        }
        let (status, _) = get_json!(&app, "/demo/prices/ABCDEFGHIJKL");
        assert_eq!(status, StatusCode::OK, "12 characters are fine");
    }

    #[actix_web::test]
    async fn chain_has_seven_moving_strikes() {
        let app = actix_test::init_service(App::new().configure(configure)).await;
        let today = Utc::now().date_naive();
        let mut previous: Option<Value> = None;
        let mut ltp_moved = false;
        for _ in 0..5 {
            let (status, body) = get_json!(&app, "/demo/chain/nifty");
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["symbol"], "NIFTY");
            let expiry =
                NaiveDate::parse_from_str(body["expiry"].as_str().unwrap(), "%Y-%m-%d").unwrap();
            // Either today's or tomorrow's date may apply around midnight.
            let days = (expiry - today).num_days();
            assert!((0..=8).contains(&days), "{expiry}");
            assert_eq!(expiry.weekday(), chrono::Weekday::Thu);

            let rows = body["data"].as_array().unwrap();
            assert_eq!(rows.len(), 7);
            let strikes: Vec<i64> = rows.iter().map(|r| r["strike"].as_i64().unwrap()).collect();
            let step = strikes[1] - strikes[0];
            assert_eq!(step, 100, "0.5 % of 24350 rounds down to 100");
            assert!(
                strikes.windows(2).all(|w| w[1] - w[0] == step),
                "{strikes:?}"
            );
            let spot = body["underlying"].as_f64().unwrap();
            assert!((spot - strikes[3] as f64).abs() <= step as f64 / 2.0 + 0.01);
            for row in rows {
                assert!(row["ltp"].as_f64().unwrap() >= 0.05, "{row}");
                assert!(row["oi"].as_u64().unwrap() >= 100, "{row}");
                let iv = row["iv"].as_f64().unwrap();
                assert!((0.05..=0.9).contains(&iv), "{row}");
            }
            // Deeper in the money, dearer.
            let ltps: Vec<f64> = rows.iter().map(|r| r["ltp"].as_f64().unwrap()).collect();
            assert!(ltps.windows(2).all(|w| w[0] >= w[1]), "{ltps:?}");
            if let Some(prev) = &previous
                && prev["data"] != body["data"]
            {
                ltp_moved = true;
            }
            previous = Some(body);
        }
        assert!(ltp_moved, "the chain moves between requests");
    }

    #[actix_web::test]
    async fn shared_state_spans_apps() {
        let state = web::Data::new(DemoState::new());
        let app1 = actix_test::init_service(
            App::new().configure(|cfg| configure_with(cfg, state.clone())),
        )
        .await;
        let app2 = actix_test::init_service(
            App::new().configure(|cfg| configure_with(cfg, state.clone())),
        )
        .await;
        let (_, a) = get_json!(&app1, "/demo/prices/ETH");
        let (_, b) = get_json!(&app2, "/demo/prices/ETH");
        assert!(b["volume"].as_u64().unwrap() > a["volume"].as_u64().unwrap());
        let markets = state.markets.lock().unwrap();
        assert_eq!(markets.quotes.len(), 1);
    }

    #[test]
    fn strike_steps_are_round() {
        assert_eq!(strike_step(24350.0), 100.0);
        assert_eq!(strike_step(64012.53), 200.0);
        assert_eq!(strike_step(100.0), 0.5);
        assert_eq!(strike_step(1.085), 0.005);
        assert_eq!(strike_step(0.158), 0.0005);
        assert_eq!(strike_json(99.5, 0.5), json!(99.5));
        assert_eq!(strike_json(0.1 + 0.2, 0.005), json!(0.3));
        assert_eq!(strike_json(24300.0, 100.0), json!(24300));
    }

    #[test]
    fn expiry_is_the_next_thursday() {
        let d = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        assert_eq!(next_expiry(d("2025-11-24")), d("2025-11-27")); // Monday
        assert_eq!(next_expiry(d("2025-11-26")), d("2025-11-27")); // Wednesday
        assert_eq!(next_expiry(d("2025-11-27")), d("2025-12-04")); // Thursday: next week's
        assert_eq!(next_expiry(d("2025-11-30")), d("2025-12-04")); // Sunday
    }

    #[test]
    fn pricing_math() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-4);
        assert!((normal_cdf(-1.96) - 0.025).abs() < 1e-4);
        // At the money: sigma * pdf(0) = 100 * 0.2 * 1 * 0.3989.
        assert!((call_price(100.0, 100.0, 0.2, 1.0) - 7.9788).abs() < 1e-3);
        // Deep in the money: intrinsic value.
        assert!((call_price(100.0, 50.0, 0.1, 0.01) - 50.0).abs() < 1e-6);
        assert_eq!(round_to(-0.001, 2), 0.0);
        assert_eq!(round_to(1.23456, 4), 1.2346);
    }

    #[test]
    fn symbols_are_bounded() {
        let mut map: HashMap<String, u8> = (0..MAX_SYMBOLS).map(|i| (i.to_string(), 0)).collect();
        make_room(&mut map, "0");
        assert_eq!(map.len(), MAX_SYMBOLS);
        make_room(&mut map, "NEW");
        assert_eq!(map.len(), MAX_SYMBOLS - 1);
    }
}
