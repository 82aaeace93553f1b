//! UniFFI's binding generator, at exactly the version the library was built with (a generator
//! of another version would read the library's metadata wrongly).
fn main() {
    uniffi::uniffi_bindgen_main()
}
