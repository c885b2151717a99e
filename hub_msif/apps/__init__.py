"""What users run: the ``hub-msif`` command line and the Gradio Space."""
