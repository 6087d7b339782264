"""aim_rt.exporters"""
