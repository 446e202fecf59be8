//! Percent-encoding of URL components, one rule for the whole hub: every byte outside RFC 3986's unreserved
//! set (`A-Z a-z 0-9 - . _ ~`) is encoded, so a value (a polling parameter, a Redis password) can never end
//! its component early or add one of its own.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, PercentEncode, utf8_percent_encode};

/// The bytes encoded: all but the unreserved ones.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `value` percent-encoded as a URL component (a `Display` and an iterator of `&str` pieces: nothing is
/// allocated until it is written).
pub fn url_component(value: &str) -> PercentEncode<'_> {
    utf8_percent_encode(value, COMPONENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_but_unreserved_bytes_is_encoded() {
        assert_eq!(url_component("aZ09-._~").to_string(), "aZ09-._~");
        assert_eq!(
            url_component("p@ss:/?#[]").to_string(),
            "p%40ss%3A%2F%3F%23%5B%5D"
        );
        assert_eq!(
            url_component("a b&c=d+é").to_string(),
            "a%20b%26c%3Dd%2B%C3%A9"
        );
    }
}
