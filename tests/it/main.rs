//! The one integration-test binary: each module is a group of tests.

mod postfix_e2e;
mod support;
