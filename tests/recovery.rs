//! Recovery: devices offline across rekeys, periodic rekeys and restarts of the daemons.
