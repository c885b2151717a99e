"""Attribution: candidate retrieval, influence scores and baselines, the ``Attributor`` flow."""
