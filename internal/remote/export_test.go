package remote

import "time"

// SetTokenClock makes c measure bearer token lifetimes by now instead of
// time.Now, so a test can let a token expire without waiting.
func SetTokenClock(c *Client, now func() time.Time) { c.auth.now = now }
