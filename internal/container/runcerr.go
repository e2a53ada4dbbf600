package container

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
)

// Why a container's command could not be started. strata run turns them
// into docker's exit statuses: 127 for ErrCommandNotFound, 126 for
// ErrCommandNotExecutable.
var (
	ErrCommandNotFound      = errors.New("command not found")
	ErrCommandNotExecutable = errors.New("command cannot be executed")
)

// StartError is runc's report that it could not start a container, as one
// sentence: `exec "foo": executable file not found in $PATH`. It unwraps to
// ErrCommandNotFound or ErrCommandNotExecutable when that is why.
type StartError struct {
	Msg string
	Err error // ErrCommandNotFound, ErrCommandNotExecutable or nil
}

func (e *StartError) Error() string { return e.Msg }
func (e *StartError) Unwrap() error { return e.Err }

// runcPrefixes are the wrappings runc puts around the reason a container
// did not start (1.1: "runc run failed: unable to start container process:
// …"; 1.2 adds "error during container init: ").
var runcPrefixes = []string{
	"runc run failed: ", "runc create failed: ", "unable to start container process: ",
	"error during container init: ", "starting container process caused: ",
}

// startError translates the message of runc's error log entry, such as
// `runc run failed: unable to start container process: exec: "foo":
// executable file not found in $PATH`.
func startError(msg string) *StartError {
	// runc's exec.LookPath of the command: `exec: "foo": <reason>`.
	if i := strings.LastIndex(msg, `exec: "`); i >= 0 {
		s := msg[i+len("exec: "):]
		e := &StartError{Msg: "exec " + s}
		switch {
		case strings.HasSuffix(s, "executable file not found in $PATH"),
			strings.HasSuffix(s, "no such file or directory"),
			strings.HasSuffix(s, "not a directory"):
			e.Err = ErrCommandNotFound
		case strings.HasSuffix(s, "permission denied"):
			e.Err = ErrCommandNotExecutable
		}
		return e
	}
	for trimmed := true; trimmed; {
		trimmed = false
		for _, p := range runcPrefixes {
			if strings.HasPrefix(msg, p) {
				msg, trimmed = msg[len(p):], true
			}
		}
	}
	return &StartError{Msg: "start container: " + msg}
}

// runcErrors returns the messages of the error entries of runc's JSON log
// (--log FILE --log-format json), oldest first.
func runcErrors(r io.Reader) []string {
	var msgs []string
	sc := bufio.NewScanner(r)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var e struct{ Level, Msg string }
		if json.Unmarshal(sc.Bytes(), &e) == nil && (e.Level == "error" || e.Level == "fatal") && e.Msg != "" {
			msgs = append(msgs, e.Msg)
		}
	}
	return msgs
}

// runcLogErrors is runcErrors of the log file at path (none if it is
// missing or empty).
func runcLogErrors(path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	return runcErrors(f)
}

// runcStderr passes runc's standard error on — the container's too, when it
// has no terminal — leaving out the line runc prints for an error of its own:
// its log holds that error as well (written first), and Run reports it
// translated.
type runcStderr struct {
	w   io.Writer
	log string // runc's --log file
}

func (s *runcStderr) Write(p []byte) (int, error) {
	n := len(p)
	if fi, err := os.Stat(s.log); err == nil && fi.Size() > 0 {
		for _, msg := range runcLogErrors(s.log) {
			line := msg + "\n"
			// runc writes the line in one write; drop it where it stands alone.
			if bytes.HasSuffix(p, []byte(line)) && (len(p) == len(line) || p[len(p)-len(line)-1] == '\n') {
				p = p[:len(p)-len(line)]
				break
			}
		}
	}
	if len(p) == 0 {
		return n, nil
	}
	if _, err := s.w.Write(p); err != nil {
		return 0, err
	}
	return n, nil
}
