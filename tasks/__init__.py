"""One thin Prefect task per pipeline stage; the maths lives in model/, the bytes in storage/."""
