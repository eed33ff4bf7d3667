//! Panics of other crates' readers on malformed files, caught and made errors: seeded fuzzing
//! finds inputs on which the `parquet` crate asserts, and on which the `tokenizers` crate
//! unwraps inside its deserializer. Such a file is an error naming it, like any other that is
//! not what it claims to be; [`catching`] lets a program's panic hook stay quiet meanwhile.

use std::cell::Cell;

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `read`; a panic inside it comes back as its message.
pub fn catch<T>(read: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

/// Whether this thread is inside [`catch`]: a panic now is an error being made, not a crash.
pub fn catching() -> bool {
    CATCHING.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_is_its_message_and_the_flag_is_down_after() {
        let got = catch(|| -> u8 {
            assert!(catching());
            panic!("bad {}", 7)
        });
        assert_eq!(got, Err("bad 7".to_string()));
        assert_eq!(catch(|| 3), Ok(3));
        assert!(!catching());
    }
}
