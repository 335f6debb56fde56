//! Ground floor: a caught panic as a message, for the places that turn a panic in a decoder or
//! a forward pass into an error for one request instead of a dead thread.

use std::any::Any;

/// The message a panic was raised with (`panic!("...")` carries a `&str` or a `String`), or
/// `fallback` when its payload is anything else.
pub fn panic_message(payload: &(dyn Any + Send), fallback: &str) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| fallback.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn str_string_and_other_payloads() {
        // What `panic!("plain")`, `panic!("{x}")` and `panic_any(7u8)` carry.
        let literal: Box<dyn Any + Send> = Box::new("plain");
        let formatted: Box<dyn Any + Send> = Box::new(String::from("with 2"));
        let other: Box<dyn Any + Send> = Box::new(7u8);
        assert_eq!(panic_message(&*literal, "?"), "plain");
        assert_eq!(panic_message(&*formatted, "?"), "with 2");
        assert_eq!(panic_message(&*other, "fallback"), "fallback");
    }
}
