//! Compile tests: what must build without a warning, and the error message
//! each misuse gets (held in the `.stderr` beside each case).

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
