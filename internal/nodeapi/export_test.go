package nodeapi

import "time"

// SetIdleTick makes the test daemon look whether it is idle every d.
func SetIdleTick(d time.Duration) { idleTick = d }
