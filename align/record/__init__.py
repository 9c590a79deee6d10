"""Recording: running a model and keeping what each module produced, as a Trace.

Index:
    trace.py    Trace and Call: one run, module by module, in memory or on disk (safetensors)
    capture.py  run a private copy of a model on a device at a precision, recording
                every module call's inputs, outputs and gradients
    loop.py     align.Recorder: record chosen steps of the user's own training loop
    arguments.py  a module call's non-tensor arguments as JSON, to call it again from a dump
    writer.py   writing recorded steps as they run (their tensors streamed), on a background thread
    buffers.py  host memory handed from one recorded step to the next
    msprobe.py  read msprobe dumps (levels L0, L1, mix; tasks tensor, statistics)
    readers.py  load_trace: open a dump of any format with the reader that recognises it
"""
