//! Compile errors for common mistakes name the fix (issue 13): each case in `tests/ui/` must
//! fail to compile with the message in its `.stderr` file. `TRYBUILD=overwrite` rewrites them
//! after a deliberate change of wording (or of the compiler's layout of errors).

#[test]
fn misuse_gives_errors_that_name_the_fix() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}
